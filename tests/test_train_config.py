"""mars train configuration: YAML + dotted overrides, clear errors before any work, the
shipped configs (the paper's hyper-parameters, docs/train.md "Recipes", the 3B ones without
weights), the config keys documented in docs/train.md, package data in pyproject."""

import dataclasses
import os
import re

import pytest
import yaml

from mars.cli import main as mars_main
from mars.train.config import (ConfigError, TrainConfig, config_path, describe, load_config, parse_overrides,
                               shipped_configs, to_dict)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")


def test_defaults_are_the_tiny_config():
    assert {"tiny", "grpo_mars_qwen2_5_vl_3b", "dapo_mars_qwen2_5_vl_3b"} <= set(shipped_configs())
    assert to_dict(load_config("tiny")) == to_dict(TrainConfig())
    assert to_dict(load_config(None)) == to_dict(TrainConfig())
    for key in ("output_dir", "seed", "max_steps", "save_every"):
        assert hasattr(TrainConfig(), key)


def test_overrides_nested_and_typed():
    cfg = load_config(None, ["loss.clip_high=0.28", "optim.lr=1e-6", "rollout.mono=single", "max_steps=7",
                             "loss.dual_clip=null", "log.progress=false", "compare.seeds=[3, 4]",
                             "task.mix={day_person: 1, night_person: 2}", "output_dir=/tmp/x y"])
    assert cfg.loss.clip_high == 0.28 and cfg.optim.lr == 1e-6 and isinstance(cfg.optim.lr, float)
    assert cfg.rollout.mono == "single" and cfg.max_steps == 7 and cfg.loss.dual_clip is None
    assert cfg.log.progress is False and cfg.compare.seeds == [3, 4] and cfg.output_dir == "/tmp/x y"
    assert cfg.task.mix == {"day_person": 1.0, "night_person": 2.0}
    assert load_config(None, [("optim.lr", "2e-6")]).optim.lr == 2e-6  # YAML 1.1 reads 1e-6 as a string
    assert parse_overrides(["a.b=[1, 2]", "c="]) == [("a.b", [1, 2]), ("c", "")]


def test_yaml_file_and_overrides_on_top(tmp_path):
    p = tmp_path / "my.yaml"
    p.write_text("max_steps: 3\nloss:\n  clip_high: 0.3\n  agg: seq-mean-token-mean\n")
    cfg = load_config(str(p), ["loss.clip_high=0.25"])
    assert cfg.max_steps == 3 and cfg.loss.clip_high == 0.25 and cfg.loss.agg == "seq-mean-token-mean"
    assert cfg.rollout.n == TrainConfig().rollout.n  # the rest stays at the defaults


@pytest.mark.parametrize("overrides, pattern", [
    (["optim.lrr=1"], r"unknown config key 'optim.lrr'; valid keys of optim: optim.prompts_per_step, optim.lr"),
    (["nope=1"], r"unknown config key 'nope'; valid keys: output_dir, seed, max_steps, save_every"),
    (["model.tiny.width=3"], r"unknown config key 'model.tiny.width'.*model.tiny.hidden_size"),
    (["max_steps=abc"], r"max_steps: expected an integer, got str 'abc'"),
    (["max_steps=1.5"], r"max_steps: expected an integer, got float"),
    (["optim.lr=fast"], r"optim.lr: expected a number, got str 'fast'"),
    (["log.progress=1"], r"log.progress: expected true or false, got int"),
    (["rollout.mono=triple"], r"rollout.mono: 'triple' is not one of 'duplicate', 'single', 'none'"),
    (["loss.agg=mean"], r"loss.agg: 'mean' is not one of 'token-mean'"),
    (["optim.betas=[0.9]"], r"optim.betas: expected a list of 2 values, got 1"),
    (["loss=3"], r"loss is a section; set one of its keys: loss.clip_low"),
    (["max_steps.x=3"], r"max_steps is not a section"),
    (["data.train=/no/such/file.parquet"], r"data.train: file not found: '/no/such/file.parquet'"),
    (["data.eval=./missing.json"], r"data.eval: file not found"),
    (["model.path=./no_such_checkpoint"], r"model.path: directory not found: './no_such_checkpoint'"),
    (["data.image_root=/no/such/dir"], r"data.image_root: directory not found"),
    (["rollout.n=0"], r"rollout.n: must be >= 1, got 0"),
    (["rollout.temperature=0"], r"rollout.temperature: sampled rollouts need a temperature > 0"),
    (["algorithm.overlong_buffer=16"], r"algorithm.overlong_buffer: must be in \[0, rollout.max_new_tokens = 16\)"),
    (["task.mix={dusk: 1}"], r"task.mix: unknown categories \['dusk'\]"),
    (["warmup.single_share=1.5"], r"warmup.single_share: must be in \[0, 1\], got 1.5"),
    (["warmup.unsure=[day_heater, dusk]"], r"warmup.unsure: unknown categories \['dusk'\]; known: day_person"),
    (["reward.name=no_such_reward"], r"reward.name: 'no_such_reward' is not registered; registered: .*vqa"),
    (["model.tiny.hidden_size=36"], r"model.tiny.hidden_size: / model.tiny.num_heads must be a multiple of 8"),
    (["max_steps"], r"override 'max_steps' is not key=value"),
])
def test_config_errors_are_clear(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, overrides)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"config file not found: 'nope.yaml'; shipped configs: .*tiny"):
        config_path("nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(str(bad))
    bad.write_text("loss: {clip_hgh: 0.3}\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'loss.clip_hgh'"):
        load_config(str(bad))


def test_cli_config_error_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    assert mars_main(["train", f"output_dir={out}", "rollout.nn=3"]) == 2
    err = capsys.readouterr().err
    assert "mars train: error: unknown config key 'rollout.nn'; valid keys of rollout: rollout.engine" in err
    assert not out.exists()
    assert mars_main(["train", f"output_dir={out}", "data.train=/no/file.parquet"]) == 2
    assert "data.train: file not found" in capsys.readouterr().err and not out.exists()
    assert mars_main(["train", "--resume", str(out)]) == 2
    assert f"--resume {out}: no such directory" in capsys.readouterr().err
    assert mars_main(["train", "--resmue", str(out)]) == 2
    assert "unknown option --resmue; options: --resume, --compare" in capsys.readouterr().err
    assert mars_main(["train", "tiny", "oops"]) == 2
    assert "expected key=value overrides" in capsys.readouterr().err
    assert mars_main(["train", "--help"]) == 0
    assert "mars train --compare" in capsys.readouterr().out
    assert mars_main(["train", "--list-keys"]) == 0
    assert "loss.clip_high = 0.2" in capsys.readouterr().out


def test_resume_config_and_overrides(tmp_path, capsys):
    from mars.train.config import load_resume_config, save_config

    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(ConfigError, match=r"config.yaml not found \(not a mars train output directory\)"):
        load_resume_config(str(run))
    save_config(load_config(None, ["max_steps=5", "loss.clip_high=0.28", "output_dir=/elsewhere"]),
                str(run / "config.yaml"))
    cfg = load_resume_config(str(run), ["max_steps=9", "log.plot_every=3", "checkpoint.keep_last=0",
                                        "optim.micro_batch_size=2", "save_every=4"])
    assert (cfg.max_steps, cfg.log.plot_every, cfg.checkpoint.keep_last, cfg.optim.micro_batch_size) == (9, 3, 0, 2)
    assert cfg.loss.clip_high == 0.28 and cfg.output_dir == str(run)  # the saved config, where it is now
    for bad in ("optim.lr=1e-3", "seed=1", "output_dir=/x", "rollout.n=2"):
        with pytest.raises(ConfigError, match=rf"--resume: {bad.split('=')[0]} cannot change when a run is "
                                              r"resumed.*keys that can: max_steps, save_every, checkpoint\.\*"):
            load_resume_config(str(run), [bad])
    with pytest.raises(ConfigError, match=r"checkpoint.keep_last: must be >= 0"):
        load_resume_config(str(run), ["checkpoint.keep_last=-1"])
    assert mars_main(["train", "--resume", str(run), "optim.lr=1"]) == 2
    assert "optim.lr cannot change" in capsys.readouterr().err
    assert mars_main(["train", "--resume", str(run), "--compare"]) == 2
    assert "no CONFIG, no --compare" in capsys.readouterr().err
    assert mars_main(["train", "--resume"]) == 2
    assert "--resume needs the run's OUTPUT_DIR" in capsys.readouterr().err
    assert mars_main(["train", "--help"]) == 0
    assert "mars train --resume OUTPUT_DIR" in capsys.readouterr().out


def test_tensorboard_option_needs_the_package(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ConfigError, match=r"log.tensorboard: needs the tensorboard package.*pip install tensorboard"):
        load_config(None, ["log.tensorboard=true"])
    assert load_config(None).log.tensorboard is False  # off: not needed


def test_shipped_3b_configs_have_the_papers_hyper_parameters():
    g = load_config("grpo_mars_qwen2_5_vl_3b", check_files=False)
    d = load_config("dapo_mars_qwen2_5_vl_3b", check_files=False)
    for c in (g, d):  # the paper's hyper-parameters (docs/train.md, "Recipes")
        assert c.model.path == "Qwen/Qwen2.5-VL-3B-Instruct" and c.model.dtype == "bfloat16"
        assert c.rollout.temperature == 1.0 and c.rollout.top_p == 0.9 and c.rollout.mono == "duplicate"
        assert c.rollout.max_prompt_length == 4096 and c.rollout.max_new_tokens == 8192
        assert c.loss.agg == "token-mean" and c.optim.lr == 1e-6 and c.loss.clip_low == 0.2
        assert c.warmup.steps == 0 and c.data.train != "embedded"
    assert (g.optim.prompts_per_step, g.rollout.n, g.loss.clip_high, g.loss.dual_clip) == (128, 14, 0.2, 3.0)
    assert (g.loss.kl_coef, g.loss.kl_type, g.algorithm.dynamic_sampling) == (0.001, "k3", False)
    assert (d.optim.prompts_per_step, d.rollout.n, d.loss.clip_high, d.loss.dual_clip) == (16, 12, 0.28, 10.0)
    assert (d.loss.kl_coef, d.optim.warmup_steps, d.algorithm.dynamic_sampling) == (0.0, 10, True)
    assert d.algorithm.overlong_buffer == 4096
    # without weights: the from_pretrained keywords the 3B run would use on this machine
    from mars.train.policy import model_load_kwargs
    import torch

    kw = model_load_kwargs(g, "cpu")
    assert kw == {"dtype": torch.bfloat16, "attn_implementation": "sdpa"}
    # with the data files present, they validate fully (files checked)
    train = os.path.join(DATA, "train.parquet")
    cfg = load_config("dapo_mars_qwen2_5_vl_3b", [f"data.train={train}", f"data.eval={os.path.join(DATA, 'spatialqa_eval.json')}",
                                                  f"model.path={DATA}"])
    assert cfg.data.train == train


def test_every_key_is_documented():
    doc = open(os.path.join(ROOT, "docs", "train.md"), encoding="utf-8").read()
    missing = [k for k, *_ in describe() if f"`{k}`" not in doc]
    assert not missing, f"docs/train.md does not list {missing}"


def test_pyproject_ships_the_configs():
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        py = tomllib.load(f)
    globs = py["tool"]["setuptools"]["package-data"]["mars.train"]
    import fnmatch

    for name in shipped_configs():
        assert any(fnmatch.fnmatch(f"configs/{name}.yaml", g) for g in globs), name


def test_describe_lists_defaults():
    rows = {k: (t, d) for k, t, d, _ in describe()}
    assert rows["rollout.mono"] == ("one of 'duplicate', 'single', 'none'", "duplicate")
    assert rows["loss.dual_clip"][0] == "float or null"
    assert len(rows) == len({k for k in rows})
    assert all(re.fullmatch(r"[a-z_0-9.]+", k) for k in rows)


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["loss.clip_high=0.28", "compare.seeds=[5]"])
    from mars.train.config import save_config

    save_config(cfg, tmp_path / "c.yaml")
    assert yaml.safe_load((tmp_path / "c.yaml").read_text())["loss"]["clip_high"] == 0.28
    assert to_dict(load_config(str(tmp_path / "c.yaml"))) == to_dict(cfg)
    assert dataclasses.replace(cfg).loss.clip_high == 0.28


def test_tiny_yaml_lists_every_default():
    """mars/train/configs/tiny.yaml is the embedded default: every key, with the value the
    config defaults give (a default changed in one place only fails here)."""
    import yaml

    from mars.train.config import config_path, to_dict

    with open(config_path("tiny")) as f:
        listed = yaml.safe_load(f)
    defaults = to_dict(load_config(None, []))

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) and k != "mix" else {f"{prefix}{k}": v})
        return out

    got, want = flat(listed), flat(defaults)
    assert got.keys() == want.keys()
    # YAML reads the bare word off as False: the config coerces it back to "off"
    assert {k: v for k, v in got.items() if got[k] != want[k]} == {"loss.rollout_is": False}
    assert to_dict(load_config("tiny", [])) == defaults


@pytest.mark.parametrize("override, msg", [
    ("optim.lr=.inf", "optim.lr: must be a finite number, got inf"),
    ("dist.timeout_s=.inf", "dist.timeout_s: must be a finite number, got inf"),
    ("loss.clip_high=.nan", "loss.clip_high: must be a finite number, got nan"),
    ("optim.betas=[0.9, .nan]", "optim.betas: must be a finite number"),
    ("task.mix={day_person: .inf}", "task.mix.day_person: must be a finite number"),
    ("data.eval_limit=-5", "data.eval_limit: must be >= 1 or null"),
    ("data.eval_limit=0", "data.eval_limit: must be >= 1 or null"),
    ("algorithm.backend=bogus", "algorithm.backend: unknown backend 'bogus'; one of auto, reference, cpu"),
    ("loss.backend=bogus", "loss.backend: unknown backend 'bogus'"),
    ("model.device=gpu", "model.device: must be auto, cpu, cuda or cuda:N"),
])
def test_bad_values_are_refused_before_any_work(override, msg):
    with pytest.raises(ConfigError, match=re.escape(msg)):
        load_config(None, [override])


def test_unavailable_device_and_backend_are_refused():
    import mars

    # no machine has 100 GPUs: refused whether CUDA is missing or has fewer devices
    with pytest.raises(ConfigError, match=r"model.device: cuda:99 (was asked for but no CUDA device is visible|"
                                          r": only \d+ CUDA device)"):
        load_config(None, ["model.device=cuda:99"])
    for name, b in mars.backends().items():
        if not b.available:
            with pytest.raises(ConfigError, match=f"loss.backend: backend '{name}' is not available here"):
                load_config(None, [f"loss.backend={name}"])
        else:
            assert load_config(None, [f"loss.backend={name}"]).loss.backend == name


def test_a_config_that_cannot_learn_is_warned_about(capsys):
    load_config(None, ["rollout.n=1", "rollout.mono=none"])
    assert "nothing can be learned" in capsys.readouterr().err
    load_config(None, ["rollout.n=1"])  # anchors: the pool has a signal
    assert "nothing can be learned" not in capsys.readouterr().err


def test_lr_schedules():
    from mars.train.update import lr_factor

    c = load_config(None, ["max_steps=10", "optim.mini_batches=2", "optim.warmup_steps=4", "optim.lr_schedule=constant"])
    assert [lr_factor(k, c) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]  # constant after the warm-up
    lin = load_config(None, ["max_steps=10", "optim.mini_batches=2", "optim.warmup_steps=4", "optim.lr_schedule=linear"])
    assert lr_factor(3, lin) == 1.0 and lr_factor(4, lin) == 1.0 and lr_factor(12, lin) == pytest.approx(0.5)
    assert lr_factor(20, lin) == 0.0 and lr_factor(25, lin) == 0.0
    cos = load_config(None, ["max_steps=10", "optim.mini_batches=2", "optim.lr_schedule=cosine"])
    assert lr_factor(0, cos) == 1.0 and lr_factor(10, cos) == pytest.approx(0.5) and lr_factor(20, cos) == pytest.approx(0)
    with pytest.raises(ConfigError, match="optim.lr_schedule"):
        load_config(None, ["optim.lr_schedule=step"])
