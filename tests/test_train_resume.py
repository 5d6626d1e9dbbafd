"""mars train --resume: a `python -m mars train` subprocess killed with SIGKILL mid-step,
killed in the middle of writing a checkpoint, stopped with SIGTERM, and resumed each time,
writes bit for bit the metrics, samples, weights and AdamW state of a run that never
stopped (CPU, one thread). Half-written checkpoints are never loaded, a stale `latest` is
not trusted, keep_last prunes, a corrupt file is an error naming it, and a run killed
before its first checkpoint starts over."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from mars.cli import main as mars_main  # noqa: E402
from mars.train import checkpoint as ckpt  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 6 RL steps of the tiny model, a checkpoint every 2: a reference model (kl_coef), a
# learning-rate warm-up that is still rising (the scheduler's state matters), two
# optimizer steps per RL step (the shuffle generator), evaluation every 2 steps
# (it draws from the torch RNG too), samples every step, and DAPO's dynamic sampling
# with G = 2 after a warm start long enough for some groups to agree (a data position that moves by
# a varying number of prompts per step)
ARGS = ["max_steps=6", "save_every=2", "checkpoint.keep_last=2", "warmup.steps=30", "warmup.batch_size=4",
        "task.eval_per_category=1", "rollout.n=2", "optim.prompts_per_step=2", "rollout.max_new_tokens=14",
        "log.progress=false", "optim.micro_batch_size=4", "optim.mini_batches=2", "eval.every=2",
        "log.plot_every=0", "loss.kl_coef=0.01", "optim.warmup_steps=8", "log.samples_every=1",
        "algorithm.dynamic_sampling=true", "algorithm.max_gen_batches=2"]
WALL_CLOCK = {"elapsed", "tokens_per_s", "warmup_time_s"}


def _mars(args, kill_at=None, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop(ckpt.faults.KILL_ENV, None)
    if kill_at:
        env[ckpt.faults.KILL_ENV] = kill_at
    return subprocess.run([sys.executable, "-m", "mars", "train", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def _lines(path):
    """Records without the wall-clock fields."""
    with open(path) as f:
        return [{k: v for k, v in json.loads(line).items() if not k.startswith("time_") and k not in WALL_CLOCK}
                for line in f]


def _steps(run):
    return [r["step"] for r in _lines(os.path.join(run, "metrics.jsonl"))]


def _ckpts(run):
    return sorted(os.listdir(os.path.join(run, "checkpoints")))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("resume") / "uninterrupted")
    res = _mars([f"output_dir={out}", *ARGS])
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def _assert_same_run(a, b):
    for name in ("metrics.jsonl", "samples.jsonl", "reward_errors.jsonl"):
        ra, rb = _lines(os.path.join(a, name)), _lines(os.path.join(b, name))
        assert ra == rb, name
    recs = _lines(os.path.join(a, "metrics.jsonl"))
    assert [r["step"] for r in recs] == list(range(7))
    assert len({r["lr"] for r in recs[1:]}) > 1 and all(r["ref_kl"] is not None for r in recs[1:])
    assert all("eval_acc_multi" in recs[s] for s in (0, 2, 4, 6))
    assert len({r["groups_drawn"] for r in recs[1:]}) > 1  # dynamic sampling drew more prompts on some steps
    from safetensors.torch import load_file

    wa, wb = (load_file(os.path.join(d, "checkpoints", "step_000006", "model.safetensors")) for d in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    oa, ob = (torch.load(os.path.join(d, "checkpoints", "step_000006", "optimizer.pt"), weights_only=True)
              for d in (a, b))
    assert oa["state"].keys() == ob["state"].keys() and len(oa["state"]) > 0
    for i in oa["state"]:
        for k in oa["state"][i]:
            assert torch.equal(oa["state"][i][k], ob["state"][i][k]), (i, k)


def test_killed_anywhere_and_resumed_is_the_same_run(uninterrupted, tmp_path):
    run = str(tmp_path / "killed")
    # SIGKILL in the middle of step 3 (after its rollouts): the step-2 checkpoint is the newest
    res = _mars([f"output_dir={run}", *ARGS], kill_at="3:rollout")
    assert res.returncode == -9, res.stderr[-3000:]
    assert _steps(run) == [0, 1, 2] and _ckpts(run) == ["latest", "reference", "step_000002"]

    # resumed, SIGKILL while writing step 4's checkpoint (before its marker): steps 3 and 4
    # are logged, a .tmp- directory is left; both must be ignored
    res = _mars(["--resume", run], kill_at="4:checkpoint")
    assert res.returncode == -9, res.stderr[-3000:]
    assert _steps(run) == [0, 1, 2, 3, 4]
    assert _ckpts(run) == [".tmp-step_000004", "latest", "reference", "step_000002"]
    assert ckpt.find_resumable(run).endswith("step_000002")

    # resumed (metrics cut back to step 2), SIGTERM during step 5: the step is finished,
    # checkpointed, and the process exits 143 with the resume hint
    res = _mars(["--resume", run], kill_at="5:rollout:TERM")
    assert res.returncode == 143, res.stderr[-3000:]
    assert f"stopped by SIGTERM after step 5; checkpoint {run}/checkpoints/step_000005" in res.stderr
    assert f"resume with: mars train --resume {run}" in res.stderr
    assert _steps(run) == [0, 1, 2, 3, 4, 5]
    assert _ckpts(run) == ["latest", "reference", "step_000004", "step_000005"]  # keep_last=2, .tmp- gone
    state = ckpt.read_trainer_state(os.path.join(run, "checkpoints", "step_000005"))
    assert state["resumable"] is True and state["step"] == 5

    # resumed to the end
    res = _mars(["--resume", run])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "checkpoint: " + os.path.join(run, "checkpoints", "step_000006") in res.stdout
    _assert_same_run(uninterrupted, run)
    summary = json.load(open(os.path.join(run, "summary.json")))  # this process wrote step 6 only
    assert summary["checkpoints_written"] == 1 and summary["checkpoint_time_s"] > 0
    with open(os.path.join(run, "metrics.jsonl")) as f:
        raw = [json.loads(line) for line in f]
    assert [r["step"] for r in raw if "time_eval" in r] == [0, 2, 4, 6]  # every phase timed
    assert _ckpts(uninterrupted) == ["latest", "reference", "step_000004", "step_000006"]


def test_killed_after_commit_before_latest(uninterrupted, tmp_path):
    """A kill between the rename of step_4 and the update of `latest`: latest still names
    step_2, the newest complete directory (step_4) is the one resumed."""
    run = str(tmp_path / "committed")
    shutil.copytree(uninterrupted, run)
    shutil.rmtree(os.path.join(run, "checkpoints", "step_000006"))
    with open(os.path.join(run, "checkpoints", "latest"), "w") as f:
        f.write("step_000002\n")
    assert ckpt.find_resumable(run).endswith("step_000004")
    # a step directory without its marker (an older, foreign or damaged one) is skipped
    os.makedirs(os.path.join(run, "checkpoints", "step_000005"))
    with pytest.warns(UserWarning, match=r"skipping .*step_000005: no trainer_state.json"):
        assert ckpt.find_resumable(run).endswith("step_000004")
    os.makedirs(os.path.join(run, "checkpoints", ".tmp-step_000007"))  # a save cut short
    with pytest.warns(UserWarning):
        assert ckpt.find_resumable(run).endswith("step_000004")


def _corrupt_run(uninterrupted, tmp_path, name):
    run = str(tmp_path / name)
    shutil.copytree(uninterrupted, run)
    return run, os.path.join(run, "checkpoints", "step_000006")


@pytest.mark.parametrize("damage", ["optimizer_garbage", "weights_truncated", "marker_garbage", "rng_missing",
                                    "reference_missing"])
def test_corrupt_checkpoint_is_an_error_naming_the_file(uninterrupted, tmp_path, capsys, damage):
    run, step = _corrupt_run(uninterrupted, tmp_path, damage)
    if damage == "optimizer_garbage":  # same size, not a torch file: the loader's error
        target = os.path.join(step, "optimizer.pt")
        n = os.path.getsize(target)
        with open(target, "wb") as f:
            f.write(b"\0" * n)
        pattern = f"{target}: corrupt, cannot be loaded"
    elif damage == "weights_truncated":
        target = os.path.join(step, "model.safetensors")
        with open(target, "r+b") as f:
            f.truncate(100)
        pattern = f"{target}: 100 bytes, the checkpoint wrote"
    elif damage == "marker_garbage":
        target = os.path.join(step, "trainer_state.json")
        with open(target, "w") as f:
            f.write('{"step": 6, "resu')
        pattern = f"{target}: corrupt"
    elif damage == "rng_missing":
        target = os.path.join(step, "rng_state.pt")
        os.remove(target)
        pattern = f"{target}: missing from checkpoint {step}"
    else:
        target = os.path.join(run, "checkpoints", "reference")
        shutil.rmtree(target)
        pattern = f"{target}: the reference model (loss.kl_coef > 0) is missing"
    err = _resume_error(run, capsys)
    assert pattern in err, err
    with open(os.path.join(run, "metrics.jsonl")) as f:  # nothing was appended or cut
        assert sum(1 for _ in f) == 7


def _resume_error(run, capsys):
    assert mars_main(["train", "--resume", run, "max_steps=7"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mars train: error: ")
    return err


def test_corrupt_file_through_the_command_line(uninterrupted, tmp_path, capsys):
    run, step = _corrupt_run(uninterrupted, tmp_path, "cli")
    with open(os.path.join(step, "scheduler.pt"), "r+b") as f:
        f.truncate(10)
    assert f"{step}/scheduler.pt: 10 bytes, the checkpoint wrote" in _resume_error(run, capsys)


def test_resume_extends_a_finished_run_and_refuses_fewer_steps(uninterrupted, tmp_path, capsys, monkeypatch):
    import mars.train.loop as loop

    def no_warm_start(*a, **k):
        raise AssertionError("a resumed run repeated the warm start")

    monkeypatch.setattr(loop, "warm_start", no_warm_start)
    run, _ = _corrupt_run(uninterrupted, tmp_path, "extend")
    assert "max_steps: 5 is below the step of the checkpoint" in _resume_error_steps(run, capsys, 5)
    assert "max_steps: 6" in open(os.path.join(run, "config.yaml")).read()  # refused: config.yaml untouched
    assert mars_main(["train", "--resume", run, "max_steps=7", "log.plot_every=0"]) == 0
    recs = _lines(os.path.join(run, "metrics.jsonl"))
    assert [r["step"] for r in recs] == list(range(8))
    assert recs[:7] == _lines(os.path.join(uninterrupted, "metrics.jsonl"))  # appended, not rewritten
    assert "step_000007" in _ckpts(run) and "step_000004" not in _ckpts(run)  # keep_last=2


def _resume_error_steps(run, capsys, n):
    assert mars_main(["train", "--resume", run, f"max_steps={n}"]) == 2
    return capsys.readouterr().err


def _killed_run_dir(tmp_path, name="fresh"):
    """OUTPUT_DIR of a run killed before its first checkpoint: config.yaml, a cut metrics.jsonl."""
    from mars.train.config import load_config, save_config

    run = tmp_path / name
    run.mkdir()
    fast = [a for a in ARGS if not a.startswith(("max_steps", "save_every", "loss.kl_coef"))]
    save_config(load_config(None, [*fast, "max_steps=1", f"output_dir={run}", "data.eval=null"]),
                str(run / "config.yaml"))
    (run / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1, "loss": 0.5}\n{"step": 2, "lo')  # a killed run's
    return run


def test_resume_without_a_checkpoint_starts_over(tmp_path, capsys):
    run = _killed_run_dir(tmp_path)
    assert mars_main(["train", "--resume", str(run)]) == 0
    err = capsys.readouterr().err
    assert "no checkpoint in" in err and "starting the run over" in err
    assert _steps(str(run)) == [0, 1] and "loss" in _lines(str(run / "metrics.jsonl"))[1]
    assert _ckpts(str(run)) == ["latest", "step_000001"]


def test_resume_never_deletes_unusable_checkpoints(tmp_path, capsys):
    """Checkpoints none of which can be resumed: --resume refuses, names each and what is
    wrong, and leaves every file as it was."""
    run = _killed_run_dir(tmp_path)
    os.makedirs(run / "checkpoints" / ".tmp-step_000002")
    os.makedirs(run / "checkpoints" / "step_000009")  # no marker
    os.makedirs(run / "checkpoints" / "step_000004")
    (run / "checkpoints" / "step_000004" / "trainer_state.json").write_text("{not json")
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    metrics = (run / "metrics.jsonl").read_text()
    with pytest.warns(UserWarning, match="skipping"):
        assert mars_main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint in" in err and "can be resumed, and nothing was deleted" in err
    assert ".tmp-step_000002: a save that was cut short" in err
    assert "step_000009/trainer_state.json: missing" in err and "step_000004/trainer_state.json: corrupt" in err
    assert "--overwrite" in err
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before
    assert (run / "metrics.jsonl").read_text() == metrics


def test_rng_state_round_trip():
    import random

    import numpy as np

    g = torch.Generator().manual_seed(3)
    state = ckpt.rng_state({"shuffle": g})
    draws = (torch.rand(3), random.random(), np.random.rand(), torch.rand(2, generator=g))
    ckpt.set_rng_state(state, {"shuffle": g})
    again = (torch.rand(3), random.random(), np.random.rand(), torch.rand(2, generator=g))
    assert torch.equal(draws[0], again[0]) and draws[1:3] == again[1:3] and torch.equal(draws[3], again[3])
    with pytest.raises(KeyError, match="generator 'other' not saved"):
        ckpt.set_rng_state(state, {"other": g})


def test_edited_config_yaml_is_refused(uninterrupted, tmp_path, capsys):
    run, _ = _corrupt_run(uninterrupted, tmp_path, "edited")
    path = os.path.join(run, "config.yaml")
    text = open(path).read()
    assert "  clip_high: 0.2\n" in text
    with open(path, "w") as f:
        f.write(text.replace("  clip_high: 0.2\n", "  clip_high: 0.28\n"))
    err = _resume_error(run, capsys)
    assert "config.yaml differs from the config checkpoint" in err and "at loss.clip_high;" in err
