"""A non-finite loss or gradient norm never reaches the weights (optim.on_nonfinite):
`stop` ends the run with exit 1 and a message naming the step, the metric and the keys to
lower, writing no checkpoint after it; `skip` drops that optimizer step and counts it."""

import json
import os

import pytest
import torch

pytest.importorskip("transformers")

from mars.cli import main as mars_main  # noqa: E402
from mars.train import update  # noqa: E402

FAST = ["warmup.steps=2", "warmup.batch_size=4", "task.eval_per_category=1", "rollout.n=3",
        "optim.prompts_per_step=2", "log.progress=false", "log.plot_every=0", "optim.micro_batch_size=4"]


def test_divergence_stops_the_run_with_the_last_checkpoint_intact(tmp_path, capsys):
    out = tmp_path / "run"
    assert mars_main(["train", f"output_dir={out}", *FAST, "max_steps=2", "save_every=1"]) == 0
    good = (out / "checkpoints" / "step_000001" / "model.safetensors").read_bytes()
    capsys.readouterr()
    # the same run resumed with a learning rate that blows up in the first update after the checkpoint
    cfg = (out / "config.yaml").read_text().replace("lr: 0.0003", "lr: 1000000.0")
    run2 = tmp_path / "run2"
    run2.mkdir()
    (run2 / "config.yaml").write_text(cfg.replace(str(out), str(run2)))
    assert mars_main(["train", str(run2 / "config.yaml"), "max_steps=3"]) == 1
    err = capsys.readouterr().err
    assert "mars train: error: the update diverged at RL step 1" in err and "Traceback" not in err
    assert "optim.lr (now 1000000.0)" in err and "optim.on_nonfinite=skip" in err
    assert not os.path.isdir(run2 / "checkpoints") or not any(
        d.startswith("step_") for d in os.listdir(run2 / "checkpoints"))  # nothing saved after the divergence
    assert (out / "checkpoints" / "step_000001" / "model.safetensors").read_bytes() == good


def test_skip_drops_the_nonfinite_step_and_counts_it(tmp_path, monkeypatch):
    real = update.accumulate_gradients
    calls = {"n": 0}

    def poisoned(model, *args, **kw):  # the second optimizer step of the run gets NaN gradients
        res = real(model, *args, **kw)
        calls["n"] += 1
        if calls["n"] == 2:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
        return res

    monkeypatch.setattr(update, "accumulate_gradients", poisoned)
    out = tmp_path / "run"
    assert mars_main(["train", f"output_dir={out}", *FAST, "max_steps=2", "optim.mini_batches=2",
                      "optim.on_nonfinite=skip"]) == 0
    recs = [json.loads(line) for line in open(out / "metrics.jsonl")][1:]
    assert [r["skipped_steps"] for r in recs] == [1, 0] and [r["optimizer_steps"] for r in recs] == [1, 2]
    from safetensors.torch import load_file

    w = load_file(str(out / "checkpoints" / "step_000002" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in w.values())


def test_stop_is_the_default(tmp_path, monkeypatch, capsys):
    real = update.accumulate_gradients

    def poisoned(model, *args, **kw):
        loss, metrics = real(model, *args, **kw)
        return float("nan"), metrics

    monkeypatch.setattr(update, "accumulate_gradients", poisoned)
    assert mars_main(["train", f"output_dir={tmp_path / 'run'}", *FAST, "max_steps=2"]) == 1
    assert "diverged at RL step 1: loss = nan" in capsys.readouterr().err


def test_nonfinite_metrics_stay_distinguishable_from_missing(tmp_path):
    """metrics.jsonl is strict JSON: NaN / inf are written as "nan" / "inf" / "-inf", null
    means not measured; read_metrics turns them back into floats."""
    import math

    from mars.train.logger import MetricsLogger, read_metrics

    log = MetricsLogger(str(tmp_path))
    log.log({"step": 1, "loss": float("nan"), "lr": float("inf"), "adv_min": float("-inf"), "gain": None,
             "grad_norm": torch.tensor(0.5)})
    log.close()
    line = (tmp_path / "metrics.jsonl").read_text()
    assert json.loads(line) == {"step": 1, "loss": "nan", "lr": "inf", "adv_min": "-inf", "gain": None,
                                "grad_norm": 0.5}
    back = read_metrics(str(tmp_path / "metrics.jsonl"))[0]
    assert math.isnan(back["loss"]) and back["lr"] == math.inf and back["adv_min"] == -math.inf
    assert back["gain"] is None and back["grad_norm"] == 0.5


def test_outputs_made_nonfinite_by_an_update_are_named_not_a_traceback(tmp_path, capsys):
    """One optimizer step per RL step at a huge learning rate: that step's gradients are
    finite, but the next generation samples from NaN probabilities (torch.multinomial would
    raise); the run stops naming the step instead."""
    assert mars_main(["train", f"output_dir={tmp_path / 'run'}", *FAST, "max_steps=4", "optim.lr=1e6",
                      "optim.mini_batches=1"]) == 1
    err = capsys.readouterr().err
    assert "diverged at RL step 2: sampling probabilities = nan" in err and "Traceback" not in err
    assert "resume from a checkpoint older than that" in err and "on_nonfinite" not in err
