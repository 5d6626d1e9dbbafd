"""``mars train`` command line (docs/train.md).

    mars train [CONFIG.yaml | NAME] [key=value ...]     train (no arguments: the embedded default)
    mars train --compare [CONFIG] [key=value ...]       GRPO vs GRPO+MARS on the same seeds
    mars train --list-keys                              every config key with its default
"""

from __future__ import annotations

import os
import sys

from .config import ConfigError, describe, load_config, shipped_configs

__all__ = ["cli_main", "USAGE"]

USAGE = """usage: mars train [CONFIG.yaml | NAME] [key=value ...]
       mars train --compare [CONFIG.yaml | NAME] [key=value ...]
       mars train --list-keys

Train a VLM with GRPO / DAPO + MARS (mono-anchored advantages). With no arguments: the
embedded default, a tiny Qwen2-VL-style model on a synthetic RGB + infrared task, on CPU in
minutes. NAME is a shipped config ({configs}). Nested keys with dots, values as YAML:
  mars train max_steps=50 loss.clip_high=0.28 rollout.mono=single
  mars train grpo_mars_qwen2_5_vl_3b model.path=/ckpt/qwen2.5-vl-3b-sft data.train=train.parquet
--compare runs GRPO (rollout.mono=none) and GRPO+MARS on compare.seeds and writes one plot.
"""


def _split_args(argv):
    flags = [a for a in argv if a.startswith("--")]
    rest = [a for a in argv if not a.startswith("--")]
    config = None
    if rest and "=" not in rest[0]:
        config, rest = rest[0], rest[1:]
    bad = [a for a in rest if "=" not in a]
    if bad:
        raise ConfigError(f"expected key=value overrides after the config, got {bad[0]!r}")
    return flags, config, rest


def _print_keys() -> None:
    for key, typ, default, help_ in describe():
        print(f"{key} = {default!r}  ({typ})\n    {help_}")


def _minutes(s: float) -> str:
    return f"{int(s // 60)}m{int(s % 60):02d}s"


def cli_main(argv) -> int:
    """Entry point of ``mars train``; returns the exit status (0 ok, 2 usage / config error)."""
    argv = list(argv)
    if "-h" in argv or "--help" in argv:
        print(USAGE.format(configs=", ".join(shipped_configs())))
        return 0
    try:
        flags, config, overrides = _split_args(argv)
        unknown = [f for f in flags if f not in ("--compare", "--list-keys")]
        if unknown:
            raise ConfigError(f"unknown option {unknown[0]}; options: --compare, --list-keys, --help")
        if "--list-keys" in flags:
            _print_keys()
            return 0
        cfg = load_config(config, overrides)
    except ConfigError as exc:
        print(f"mars train: error: {exc}", file=sys.stderr)
        return 2
    if "--compare" in flags:
        from .compare import run_compare

        explicit_dir = any(o.split("=", 1)[0].strip() == "output_dir" for o in overrides)
        res = run_compare(cfg, output_dir=None if explicit_dir or config else "mars_train/compare")
        print(res.table)
        print(f"\nplot:    {res.plot_path}\nsummary: {res.summary_path}")
        return 0
    from .loop import train

    res = train(cfg)
    steps = [r for r in res.records if r.get("step", 0) >= 1]
    print(f"\nmars train: done in {_minutes(res.wall_time)} ({len(steps)} RL steps)")
    if steps:
        k = min(10, len(steps))
        first = sum(r["reward_multi"] for r in steps[:k]) / k
        last = sum(r["reward_multi"] for r in steps[-k:]) / k
        print(f"  multi reward: step 1 {steps[0]['reward_multi']:.3f} -> step {steps[-1]['step']} "
              f"{steps[-1]['reward_multi']:.3f} (mean of the first / last {k} steps: {first:.3f} -> {last:.3f})")
    if res.final_eval:
        ev = res.final_eval
        names = ["rgb", "infrared"] if cfg.data.train == "embedded" else None
        parts = [f"multi {ev['eval_acc_multi']:.3f}"]
        k = 0
        while f"eval_acc_source_{k}" in ev:
            parts.append(f"{names[k] if names and k < len(names) else f'source {k}'} only "
                         f"{ev[f'eval_acc_source_{k}']:.3f}")
            k += 1
        print("  held-out accuracy: " + ", ".join(parts))
    print(f"  metrics:    {res.metrics_path}")
    print(f"  plot:       {res.plot_path}")
    print(f"  checkpoint: {res.checkpoint}")
    heldout = os.path.join(cfg.output_dir, "heldout", "heldout.json")
    if os.path.isfile(heldout):
        print(f"  evaluate:   mars eval --model {res.checkpoint} --data {heldout} --mono "
              f"--max-new-tokens {cfg.rollout.max_new_tokens}")
    return 0
