"""mars train faults: SIGINT from outside a running `python -m mars train` (the step
finishes, a checkpoint is written, exit 130 with the resume hint), a second signal
abandons the step, a signal during the warm start, out-of-memory in each phase re-raised
with a note naming the knob, TensorBoard logging (the real SummaryWriter and a stand-in
writer through the logger's seam) and its missing-package error."""

import json
import os
import signal
import subprocess
import sys
import time
import traceback

import pytest
import torch

pytest.importorskip("transformers")

from mars.cli import main as mars_main  # noqa: E402
from mars.train import faults, logger as logger_mod  # noqa: E402
from mars.train.config import load_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["warmup.steps=0", "task.eval_per_category=1", "rollout.n=3", "optim.prompts_per_step=2",
        "rollout.max_new_tokens=8", "log.progress=false", "log.plot_every=0", "data.eval=null", "max_steps=2"]


def _records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# --------------------------------------------------------------------------- signals
def test_sigint_from_outside_checkpoints_and_says_how_to_resume(tmp_path):
    out = str(tmp_path / "run")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop(faults.KILL_ENV, None)
    proc = subprocess.Popen([sys.executable, "-m", "mars", "train", f"output_dir={out}", *FAST, "max_steps=500",
                             "warmup.steps=2", "warmup.batch_size=4"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            if os.path.isfile(os.path.join(out, "metrics.jsonl")) and any(
                    r["step"] >= 1 for r in _records(out)):
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    last = _records(out)[-1]["step"]
    assert 1 <= last < 500
    ckpt = os.path.join(out, "checkpoints", f"step_{last:06d}")
    assert f"stopped by SIGINT after step {last}; checkpoint {ckpt}; resume with: mars train --resume {out}" in err
    state = json.load(open(os.path.join(ckpt, "trainer_state.json")))
    assert state["step"] == last and state["resumable"] is True
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pt", "model.safetensors"} <= set(os.listdir(ckpt))


def test_second_signal_abandons_the_step(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    saved = []
    with faults.StopSignals(str(tmp_path), quiet=True) as stop:
        stop.check(1, lambda: saved.append(1))  # no signal yet: nothing happens
        assert stop.requested is None and not saved
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert stop.requested == signal.SIGTERM  # the first one only asks
        with pytest.raises(faults.Interrupted) as exc:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        assert exc.value.exit_code == 143 and exc.value.checkpoint is None
        assert "stopped by SIGTERM in the middle of a step; no checkpoint was written yet" in str(exc.value)
        assert f"resume with: mars train --resume {tmp_path}" in str(exc.value)
        with pytest.raises(faults.Interrupted, match=r"after step 4; checkpoint /ck/step_4; resume with") as exc:
            stop.check(4, lambda: "/ck/step_4")  # after a finished step: checkpoint, then stop
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored


def test_signal_during_the_warm_start(tmp_path, capsys, monkeypatch):
    import mars.train.warm_start as warm

    real = warm.warmup_target
    calls = []

    def target(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **k)

    monkeypatch.setattr(warm, "warmup_target", target)
    out = tmp_path / "w"
    assert mars_main(["train", f"output_dir={out}", *FAST, "warmup.steps=50", "warmup.batch_size=2"]) == 130
    err = capsys.readouterr().err
    assert "stopped by SIGINT during the warm start; no checkpoint was written yet (resuming starts the run " \
           f"over); resume with: mars train --resume {out}" in err
    assert len(calls) == 2  # the warm-start step in progress finished, no more
    assert not os.path.exists(out / "checkpoints" / "latest")


# --------------------------------------------------------------------------- out of memory
def _oom(*a, **k):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.mark.parametrize("phase, target, knobs", [  # target: "module.name" under mars.train, or generate_ids
    ("generation", "loop.collect_batch", ["rollout.max_batch_rows (rows per model.generate, now None)",
                                     "optim.prompts_per_step x rollout.n (now 2 x 3)"]),
    ("evaluation", "generate_ids", ["rollout.max_batch_rows"]),
    ("old_logp", "update.row_logprobs", ["optim.micro_batch_size (rows per forward / backward, now 64)",
                                  "loss.fused=true"]),
    ("update", "loop.policy_update", ["optim.micro_batch_size", "loss.fused=true", "model.gradient_checkpointing=true"]),
])
def test_out_of_memory_names_the_knob_and_is_raised(tmp_path, monkeypatch, phase, target, knobs):
    import importlib

    from mars.rollout import HFEngine

    if target == "generate_ids":
        monkeypatch.setattr(HFEngine, "generate_ids", _oom)
    else:
        module, name = target.rsplit(".", 1)
        monkeypatch.setattr(importlib.import_module(f"mars.train.{module}"), name, _oom)
    out = tmp_path / phase
    extra = ["data.eval=embedded"] if phase == "evaluation" else []
    with pytest.raises(torch.OutOfMemoryError, match="CUDA out of memory. Tried to allocate") as exc:
        mars_main(["train", f"output_dir={out}", *FAST, *extra])
    notes = "\n".join(getattr(exc.value, "__notes__", []))
    assert f"mars train: out of memory during {phase}; lower " in notes
    for k in knobs:
        assert k in notes, (k, notes)
    assert f"mars train --resume {out} KEY=VALUE" in notes
    assert notes in "".join(traceback.format_exception(exc.value))  # printed with the traceback


def test_out_of_memory_message_of_the_fused_loss_and_vllm():
    cfg = load_config(None, ["loss.fused=true", "loss.chunk_size=512", "model.gradient_checkpointing=true"])
    msg = faults.oom_message("update", cfg)
    assert "loss.chunk_size (tokens per logits block of the fused loss, now 512)" in msg
    assert "gradient_checkpointing" not in msg and "loss.fused=true" not in msg

    class R:
        engine, max_batch_rows, n = "vllm", 8, 4

    cfg.rollout = R()
    assert "gpu_memory_utilization (the GPU memory fraction vLLM takes)" in faults.oom_message("generation", cfg)


def test_other_errors_are_not_touched():
    with pytest.raises(RuntimeError) as exc:
        with faults.oom_hint("update", load_config(None)):
            raise RuntimeError("shape mismatch")
    assert not getattr(exc.value, "__notes__", None)


# --------------------------------------------------------------------------- tensorboard
def test_tensorboard_logging_real_writer(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    assert mars_main(["train", f"output_dir={out}", *FAST, "log.tensorboard=true"]) == 0
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    recs = {r["step"]: r for r in _records(out)}
    events = acc.Scalars("reward_multi")
    assert [e.step for e in events] == [1, 2]
    assert [e.value for e in events] == pytest.approx([recs[1]["reward_multi"], recs[2]["reward_multi"]])
    assert {"loss", "time_update", "gen_tokens"} <= set(acc.Tags()["scalars"])


class StandIn:
    """A SummaryWriter stand-in: records add_scalar calls."""

    made = []

    def __init__(self, log_dir, purge_step=None):
        self.log_dir, self.purge_step, self.scalars, self.closed = log_dir, purge_step, [], False
        StandIn.made.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        pass

    def close(self):
        self.closed = True


def test_tensorboard_through_the_seam_and_on_resume(tmp_path, monkeypatch):
    monkeypatch.setattr(logger_mod, "make_summary_writer", StandIn)
    StandIn.made.clear()
    log = logger_mod.MetricsLogger(str(tmp_path), tensorboard=True)
    log.log({"step": 0, "eval_acc_multi": 0.5})
    log.log({"step": 1, "loss": torch.tensor(0.25), "reward_mono": None, "note": "x", "flag": True,
             "lr": float("nan")})
    log.log({"step": 2, "loss": 0.125})
    log.close()
    w = StandIn.made[0]
    assert w.log_dir == str(tmp_path / "tensorboard") and w.purge_step is None and w.closed
    assert w.scalars == [("eval_acc_multi", 0.5, 0), ("loss", 0.25, 1), ("loss", 0.125, 2)]
    # resumed after step 1: the file is cut back, TensorBoard purges the later steps
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss"')  # half a line of a killed writer
    log = logger_mod.MetricsLogger(str(tmp_path), tensorboard=True, resume_step=1)
    assert [r["step"] for r in log.records] == [0, 1] and StandIn.made[1].purge_step == 2
    log.log({"step": 2, "loss": 1.0})
    log.close()
    assert [r["step"] for r in _records(str(tmp_path))] == [0, 1, 2]
    assert _records(str(tmp_path))[-1]["loss"] == 1.0


def test_tensorboard_missing_package_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"log.tensorboard=true needs the tensorboard package: pip install "
                                          r"tensorboard"):
        logger_mod.make_summary_writer(str(tmp_path))
