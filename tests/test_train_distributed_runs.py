"""``mars train`` and ``loop.train`` with 2 CPU processes under torchrun (gloo):
``test_torchrun_mars_train_resume_bit_exact`` runs the whole ``mars train`` under torchrun
(DDP and FSDP2, about 15-30 s each) and resumes it bit for bit; a diverging update stops
every rank together; ``test_mars_train_two_processes_equal_one`` runs ``loop.train`` in one
process and in two (tests/dist_worker.py's "train" scenario: a rollout engine seeded per
prompt, so both runs generate the same rollouts) and compares the logged steps and the
weights; the tests after it stop a 2-process run with SIGTERM to one rank and resume it
("signal", "signal_resume") and run it with FSDP2 ("train_fsdp2"). 261 s on the 2-core dev
machine under load (docs/distributed.md). The building blocks: tests/test_train_distributed.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from dist_worker import HERE, ROOT, _torchrun


# ------------------------------------------------------------------------------- mars train under torchrun
E2E_ARGS = ["max_steps=3", "save_every=1", "warmup.steps=3", "optim.prompts_per_step=4", "rollout.n=4",
            "optim.mini_batches=2", "optim.micro_batch_size=5", "eval.every=0", "task.eval_per_category=2",
            "log.progress=false", "log.plot_every=0"]


def _mars_train_torchrun(*args, returncode=0):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("WORLD_SIZE", None)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "mars", "train", *args], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == returncode, p.stdout[-3000:] + p.stderr[-6000:]
    return p


def test_torchrun_every_rank_stops_together(tmp_path):
    """Under torchrun a diverging update stops every rank at the same step (the decision is
    on the all-reduced gradient norm): torchrun exits 1, rank 0 says why once, no rank hangs
    and no checkpoint is written; a fresh run into that directory's earlier checkpoints is
    refused on every rank (their exit status 2) and nothing is deleted."""
    pytest.importorskip("transformers")
    a = str(tmp_path / "a")
    p = _mars_train_torchrun(f"output_dir={a}", *E2E_ARGS, "optim.lr=1e6", returncode=1)
    assert p.stderr.count("mars train: error: the update diverged at RL step 1") == 1, p.stderr[-3000:]
    assert not os.path.isdir(os.path.join(a, "checkpoints")) or not any(
        d.startswith("step_") for d in os.listdir(os.path.join(a, "checkpoints")))
    b = str(tmp_path / "b")
    _mars_train_torchrun(f"output_dir={b}", *E2E_ARGS, "max_steps=1")
    before = sorted(os.listdir(os.path.join(b, "checkpoints")))
    p = _mars_train_torchrun(f"output_dir={b}", *E2E_ARGS, "max_steps=1", returncode=1)  # torchrun: 1 if a rank failed
    assert p.stderr.count("holds checkpoints of an earlier run") == 1, p.stderr[-3000:]
    assert "exitcode  : 2" in p.stderr  # the ranks' own status
    assert sorted(os.listdir(os.path.join(b, "checkpoints"))) == before


def _records(d):
    skip = ("time_", "elapsed", "tokens_per_s", "warmup_time")
    with open(os.path.join(d, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if not k.startswith(skip)} for line in f]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_torchrun_mars_train_resume_bit_exact(tmp_path, strategy):
    """torchrun --nproc_per_node 2 -m mars train (DDP, and FSDP2 whose optimizer state is
    gathered unsharded into optimizer.pt and sharded again on resume): rank 0 alone reports
    and writes, every checkpoint carries both ranks' RNG files, and a run resumed from
    step 2 writes the metrics and step-3 weights of the uninterrupted run, bit for bit."""
    pytest.importorskip("transformers")
    import shutil

    from safetensors.torch import load_file

    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    out = _mars_train_torchrun(f"output_dir={a}", f"dist.strategy={strategy}", *E2E_ARGS)
    assert out.stdout.count("mars train: done") == 1
    for step in (2, 3):
        ck = os.path.join(a, "checkpoints", f"step_{step:06d}")
        assert {"rng_state_rank0.pt", "rng_state_rank1.pt"} <= set(os.listdir(ck))
        with open(os.path.join(ck, "trainer_state.json")) as f:
            assert json.load(f)["resumable"]
    recs = _records(a)
    assert [r["step"] for r in recs] == [0, 1, 2, 3]
    assert all(r["rollouts"] == 16 and r["optimizer_steps"] == 2 for r in recs[1:])  # both ranks' rows
    shutil.copytree(a, b)
    shutil.rmtree(os.path.join(b, "checkpoints", "step_000003"))  # as if stopped after step 2
    _mars_train_torchrun("--resume", b)
    assert _records(b) == recs
    wa = load_file(os.path.join(a, "checkpoints", "step_000003", "model.safetensors"))
    wb = load_file(os.path.join(b, "checkpoints", "step_000003", "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    oa = torch.load(os.path.join(a, "checkpoints", "step_000003", "optimizer.pt"), weights_only=True)
    ob = torch.load(os.path.join(b, "checkpoints", "step_000003", "optimizer.pt"), weights_only=True)
    sa, sb = oa["state"], ob["state"]
    assert sa.keys() == sb.keys() and len(sa) > 0
    if strategy == "fsdp2":  # the whole (unsharded) state, keyed by parameter names
        assert all(isinstance(k, str) for k in sa)
        assert all(sa[k]["exp_avg"].shape == wa[k.removeprefix("policy.")].shape for k in sa
                   if k.removeprefix("policy.") in wa)
    assert all(torch.equal(sa[k][n], sb[k][n]) for k in sa for n in sa[k])


def _gloo():
    pytest.importorskip("transformers")
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")


_SKIP = ("time_", "elapsed", "tokens_per_s", "warmup_time")


def _strip(recs, more=()):
    """The records without timings (and without keys starting with ``more``)."""
    return [{k: v for k, v in r.items() if not k.startswith(_SKIP + more)} for r in recs]


def _assert_records_close(a, b):
    """Every number of records ``b`` equals ``a``'s up to float32 summation order: a wrong
    weight, a missing world-size factor or local counts are off by 1e-2 or more."""
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys(), set(ra) ^ set(rb)
        for k, v in ra.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                assert rb[k] == pytest.approx(v, rel=1e-5, abs=1e-6), (ra["step"], k, v, rb[k])
            else:
                assert rb[k] == v, (ra["step"], k)


@pytest.fixture(scope="module")
def train_runs(tmp_path_factory):
    """loop.train ("train" scenario) in one process and under torchrun with 2 (DDP)."""
    _gloo()
    out = tmp_path_factory.mktemp("train")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(k, None)
    p = subprocess.run([sys.executable, HERE, "train", str(out)], env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    with open(out / "train_rank0.json") as f:
        one = json.load(f)
    two, _ = _torchrun("train", out)
    return out, one, two


def test_mars_train_two_processes_equal_one(train_runs):
    """loop.train in one process and under torchrun with 2 (the same rollouts: a per-prompt
    seeded engine; DAPO dynamic sampling without anchors, which drops groups and draws 2-3
    generation batches a step, so the ranks keep different numbers of groups and must agree
    through union_sets; one mini-batch): every logged number of steps 0-3 is the
    one-process run's (the loss, grad_norm, clip fractions and counts of both ranks' rows
    together), both ranks log the same reduced records, rank 0 alone writes the run's
    files, and the weights after three AdamW steps agree to Adam's rounding."""
    from safetensors.torch import load_file

    _, one, two = train_runs
    assert one["world_size"] == 1 and [r["world_size"] for r in two] == [2, 2]
    assert _strip(two[0]["records"], ("eval_",)) == _strip(two[1]["records"])  # the reduced record, every rank
    assert not any(k.startswith("eval_") for r in two[1]["records"] for k in r)  # rank 0 alone evaluates
    a, b = _strip(one["records"]), _strip(two[0]["records"])
    assert [r["step"] for r in a] == [0, 1, 2, 3]
    _assert_records_close(a, b)
    assert a[1]["rollouts"] == 16 and a[1]["optimizer_steps"] == 1 and a[1]["grad_norm"] > 0
    assert set(two[0]["files"]) >= {"metrics.jsonl", "config.yaml", "summary.json", "checkpoints"}
    assert two[1]["files"] is None and two[0]["checkpoint"] == two[1]["checkpoint"]
    w1 = load_file(os.path.join(one["checkpoint"], "model.safetensors"))
    w2 = load_file(os.path.join(two[0]["checkpoint"], "model.safetensors"))
    diff = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    assert diff <= 3 * 1e-4 * 1.01  # three Adam steps of lr 1e-4: a gradient entry near 0 may flip sign


def test_signal_to_one_rank_stops_both_and_resumes_bit_exact(train_runs):
    """SIGTERM to rank 1 alone in the middle of step 2: the ranks agree on it after the
    step (agree_signal; without it rank 1 alone would enter the checkpoint's collectives),
    both checkpoint step 2 and raise Interrupted; resumed, the run logs what the
    uninterrupted 2-process run logged and ends with its weights, bit for bit."""
    from safetensors.torch import load_file

    out, _, two = train_runs
    sig, _ = _torchrun("signal", out)
    ck = os.path.join(str(out), "signal", "checkpoints", "step_000002")
    assert [r["interrupted"] for r in sig] == [[15, 2, ck]] * 2
    assert {"rng_state_rank0.pt", "rng_state_rank1.pt"} <= set(os.listdir(ck))
    resumed, _ = _torchrun("signal_resume", out)
    with open(os.path.join(str(out), "signal", "metrics.jsonl")) as f:
        logged = _strip([json.loads(line) for line in f])
    assert logged == _strip(two[0]["records"])
    w2 = load_file(os.path.join(two[0]["checkpoint"], "model.safetensors"))
    w3 = load_file(os.path.join(resumed[0]["checkpoint"], "model.safetensors"))
    assert all(torch.equal(w2[k], w3[k]) for k in w2)


def test_mars_train_fsdp2_equals_ddp(train_runs):
    """dist.strategy=fsdp2 through loop.train (sharded training copy, the gathered weights
    loaded back into the generating model after every update, checkpoints with the
    gathered optimizer state): the same logged numbers as DDP up to float rounding, and a resumable final
    checkpoint with the DDP run's weights up to Adam's rounding."""
    from safetensors.torch import load_file

    out, _, two = train_runs
    fs, _ = _torchrun("train_fsdp2", out)
    assert _strip(fs[0]["records"], ("eval_",)) == _strip(fs[1]["records"])
    _assert_records_close(_strip(two[0]["records"]), _strip(fs[0]["records"]))
    with open(os.path.join(fs[0]["checkpoint"], "trainer_state.json")) as f:
        assert json.load(f)["resumable"] is True
    w2 = load_file(os.path.join(two[0]["checkpoint"], "model.safetensors"))
    wf = load_file(os.path.join(fs[0]["checkpoint"], "model.safetensors"))
    assert max(float((w2[k] - wf[k]).abs().max()) for k in w2) <= 3 * 1e-4 * 1.01
