"""`mars train`: the thin MARS trainer (docs/train.md).

    from mars.train import load_config, train
    cfg = load_config(None, ["max_steps=20"])        # the embedded tiny default
    result = train(cfg)                              # TrainResult: metrics, plot, checkpoint
    train(load_resume_config("mars_train/tiny"), resume=True)   # go on from its newest checkpoint

The trainer is an application of the public ops (mars.mono_anchored_advantage, mars.loss)
and of mars.rollout / mars.rewards / mars.data; nothing below it imports it.
"""

from .config import ConfigError, TrainConfig, load_config, load_resume_config, shipped_configs

__all__ = ["ConfigError", "TrainConfig", "load_config", "load_resume_config", "shipped_configs", "train", "cli_main"]


def __getattr__(name):
    if name == "train":
        from .loop import train
        return train
    if name == "cli_main":
        from .command import cli_main
        return cli_main
    raise AttributeError(f"module 'mars.train' has no attribute {name!r}")
