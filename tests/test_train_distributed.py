"""Data parallel building blocks (mars/train/distributed.py): 2 CPU processes under
torchrun (gloo) against one process on the same whole batch, and the one-process fallback,
argument checks and helpers of the integration.

The processes run tests/dist_worker.py (the worker and the shared helpers): two launches in
all (about 10 s each on a quiet 2-core CPU), "main" (gradients, AdamW step, FSDP2, unused
parameters, metrics, the first half of the resume check) and "resume" (a fresh pair of
processes going on from the checkpoint). ``mars train`` itself under torchrun:
tests/test_train_distributed_runs.py.

Tolerances. Where the split run and the one-process run put the same rows in the same
micro-batches (micro_batch_size = rows per rank) every float operation is the same, the
loss multiplier 2 is exact (a power of two) and gloo's sum of two gradients is the
one-process accumulation gA + gB: the gradients are compared **bit for bit**. Where the
one-process run puts all rows in one micro-batch, the matmuls see other shapes (padding
to another length, another number of rows) and sum in another order: the comparison is
max |g_split - g_whole| <= 1e-5 * max |g_whole| (float32 eps is 1.2e-7; 2 layers, 16
rows: the measured ratio is ~1e-7); a scaling mistake (a missing or extra factor of the
world size, local instead of global counts) is off by 30% or more.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from dist_worker import AGGS, G, M, P, _batch, _cfg, _grads, _setup, _torchrun, _train_inputs


@pytest.fixture(scope="module")
def main_run(tmp_path_factory):
    pytest.importorskip("transformers")
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path_factory.mktemp("dist")
    res, wall = _torchrun("main", out)
    print(f"torchrun main: {wall:.1f} s")
    return out, res


def test_two_ranks_own_disjoint_prompts_and_their_advantages(main_run):
    _, res = main_run
    assert [r["world_size"] for r in res] == [2, 2] and [r["backend"] for r in res] == ["gloo", "gloo"]
    a, b = (set(r["local_prompts"]) for r in res)
    assert len(a) == len(b) == P // 2 and not a & b
    for r in res:  # a prompt's rollouts and anchors on one rank: its advantages need no gather
        assert r["adv_max_diff"] == 0.0


@pytest.mark.parametrize("agg", AGGS)
def test_split_gradients_equal_one_process(main_run, agg):
    _, res = main_run
    for r in res:
        g = r["grads"][agg]
        assert g["none_mismatch"] == 0
        assert g["bit_equal_same_micro_batches"], (agg, g["max_diff_same_mb"])
        assert g["max_diff_whole"] <= 1e-5 * g["scale"], (agg, g["max_diff_whole"], g["scale"])
        assert g["replica_max_diff_grad"] == 0.0
        # the loss and the token-weighted metrics are the whole batch's, on every rank
        assert g["loss_dp"] == pytest.approx(g["loss_whole"], rel=1e-5, abs=1e-7)
        assert g["metrics_dp"]["num_tokens"] == g["metrics_whole"]["num_tokens"]
        for k, v in g["metrics_whole"].items():
            assert g["metrics_dp"][k] == pytest.approx(v, rel=1e-5, abs=1e-7), k
    assert res[0]["grads"][agg]["loss_dp"] == res[1]["grads"][agg]["loss_dp"]


def test_the_world_size_multiplier_is_needed(main_run):
    _, res = main_run
    for r in res:  # DDP averages: without the factor 2 the gradient is half the batch's
        assert r["grads"]["token-mean"]["without_multiplier_rel"] == pytest.approx(0.5, rel=1e-3)


def test_adamw_step_identical_on_ranks_and_equal_to_one_process(main_run):
    _, res = main_run
    for r in res:
        a = r["adamw"]
        assert a["replica_max_diff"] == 0.0
        assert a["max_update"] > 1e-5  # the step moved the weights (lr 1e-4: Adam moves each by ~lr)
        # Adam's first step is lr * g / (|g| + eps): sign-like, so a gradient entry near 0 can move a weight
        # by up to lr between runs whose gradients differ at the ulp level; most stay within 1e-7
        assert a["max_diff_vs_1proc"] <= 1e-4 * 1.01
        for k in ("loss", "grad_norm", "clip_frac_high", "clip_frac_low", "approx_kl"):
            assert a["upd_dp"][k] == pytest.approx(a["upd_ref"][k], rel=1e-5, abs=1e-7), k
        assert a["upd_dp"]["optimizer_steps"] == a["upd_ref"]["optimizer_steps"] == 1


def test_a_rank_without_rows_takes_part_in_the_update(main_run):
    _, res = main_run
    for r in res:
        e = r["empty_rank"]
        assert e["steps"] == [2, 2] and e["moved"] > 1e-5
        assert e["replica_max_diff"] == 0.0
        # rank 1 adds exact zeros (loss times 0; DDP averages 2 g and 0): one process's update on rank 0's rows
        assert e["max_diff"] == 0.0, e
        assert e["loss"][0] == e["loss"][1] and e["grad_norm"][0] == e["grad_norm"][1]


def test_fsdp2_on_cpu_gloo(main_run):
    _, res = main_run
    for r in res:
        f = r["fsdp2"]
        assert f["none_mismatch"] == 0
        # rank 1 has fewer rows and micro-batches: padded, and equal to one process on the same rows
        assert f["max_diff_uneven"] <= 1e-5 * f["scale_uneven"]
        assert f["whole_vs_uneven_rel"] > 1e-3  # dropping the two rows matters: the check can fail
        assert f["step_max_diff"] <= 1e-4 * 1.01 and f["state_dict_max_diff"] <= 1e-4 * 1.01
        assert f["replica_max_diff"] == 0.0
        assert f["grad_norm"] > 0


def test_ddp_with_find_unused_parameters_and_text_only_prompts(main_run):
    _, res = main_run
    for r in res:
        u = r["unused"]  # vision tower used on rank 0 only
        assert u["none_mismatch"] == 0
        assert u["find_unused_max_diff"] <= 1e-5 * u["scale"]
        assert u["find_unused_replica_grad_diff"] == 0.0
        a = r["unused_all"]  # vision tower used on no rank: its grads stay None, as in one process
        assert a["vision_params"] > 0 and a["vision_grads_none"] == a["vision_params"]
        assert a["none_mismatch"] == 0 and a["find_unused_max_diff"] <= 1e-5 * a["scale"]
        # without find_unused_parameters DDP silently reduces nothing: the ranks' gradients differ
        assert a["no_find_unused_replica_grad_diff"] > 1e-6


def test_metrics_reduced_to_the_whole_batch(main_run):
    _, res = main_run
    for r in res:
        red, whole = r["metrics"]["reduced"], r["metrics"]["whole"]
        for k, v in whole.items():
            if v is None:
                assert red[k] is None, k
            else:
                # float32 step_metrics (adv_mean: a mean of numbers of size 1 summing to ~0): 1e-6 absolute;
                # a wrong weight is off by 1e-2 or more (the ranks' shards differ)
                assert red[k] == pytest.approx(v, rel=1e-6, abs=1e-6), k
        assert red["time_step"] == 2.0 and red["time_update"] == 1.0  # max: the slowest rank
        assert red["tokens_per_s"] == pytest.approx(whole["gen_tokens"] / 2.0)
        assert red["eval_acc_multi"] == 0.75  # rank 0's evaluation
        assert red["rollouts"] == 3 * G and red["anchors"] == 3 * M
        # the plain mean of the ranks' means is not the batch's: the check can tell
        assert abs(r["metrics"]["unweighted_reward_multi"] - whole["reward_multi"]) > 1e-3
    assert res[0]["metrics"]["reduced"] == res[1]["metrics"]["reduced"]


def test_collectives_of_the_loop_integration(main_run):
    out, res = main_run
    for r in res:
        c = r["collectives"]
        assert c["union"] == [0, 1, 10]
        assert c["any_rank_1"] is True and c["any_rank_none"] is False
        assert c["signal"] == 15 and c["no_signal"] is None  # every rank stops after the same step
        assert c["rng_restored"]  # rank r's own generator state came back from rng_state_rank{r}.pt
        assert c["null_logger"] == [True, True, True, 1]
        assert c["sync_copy_max_diff"] == 0.0 and c["sync_copy_moved"] > 0  # the FSDP2 step reached the copy
    assert res[0]["collectives"]["rng_files"] == ["rng_state_rank0.pt", "rng_state_rank1.pt"]
    uid, ids, prompt = res[0]["collectives"]["rank0_first"]
    assert res[0]["collectives"]["padding_row"] == [uid, False, ids, prompt, True]  # rank 0's own row
    assert res[1]["collectives"]["padding_row"] == [uid, True, ids, prompt, True]  # broadcast, sample stripped
    assert res[1]["collectives"]["rng_files"] is None
    lines = [json.loads(x) for x in res[0]["collectives"]["errors"]]
    assert lines == [{"step": 3, "sample_id": "g/r0", "reward": "vqa", "error": "boom"}]  # rank 1's, by rank 0


def test_resumed_two_process_run_equals_uninterrupted(main_run):
    out, res = main_run
    for r in res:
        assert r["resume"]["straight_loss_1"] == r["resume"]["first_loss_1"]
    second, wall = _torchrun("resume", out)
    print(f"torchrun resume: {wall:.1f} s")
    for r, first in zip(second, res):
        assert r["resumed_loss_2"] == first["resume"]["straight_loss_2"]
        assert r["bit_equal_to_straight"], r["max_diff_to_straight"]
        assert r["replica_max_diff"] == 0.0
        assert "3-process" in r["world_size_error"] or "2-process" in r["world_size_error"]


# ------------------------------------------------------------------------------- one process
def test_single_process_fallback_without_env(monkeypatch):
    pytest.importorskip("transformers")
    from mars.train import distributed as D, metrics as M, update as U

    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    info = D.init_distributed(device_kind="cpu")
    assert info == D.DistInfo() and info.is_main and not info.distributed
    assert not torch.distributed.is_initialized()
    assert D.shard_prompts([1, 2, 3], info) == [1, 2, 3]
    assert D.global_counts(7, 3, info) == (7, 3)
    assert D.broadcast_object({"a": 1}, info) == {"a": 1}
    rec = {"reward_multi": 0.5, "time_step": 1.0}
    assert M.reduce_metrics(rec, info) == rec
    cfg = _cfg("optim.micro_batch_size=5")
    policy, enc, task = _setup(cfg)
    assert D.wrap_model(policy.model, info, "ddp") is policy.model
    assert D.wrap_model(policy.model, info, "fsdp2") is policy.model
    assert D.unwrap(policy.model) is policy.model and D.loss_multiplier(policy.model, info) == 1.0
    _, rows = _batch(enc, task, len(policy.tokenizer), step=1)
    tr, adv, old, _ = _train_inputs(rows, cfg)
    policy.model.zero_grad(set_to_none=True)
    a = U.accumulate_gradients(policy.model, tr, adv, old, None, cfg, enc.pad_token_id, "cpu")
    ga = _grads(policy.model)
    policy.model.zero_grad(set_to_none=True)
    b = U.accumulate_gradients(policy.model, tr, adv, old, None, cfg, enc.pad_token_id, "cpu", info=info)
    gb = _grads(policy.model)
    assert a == b  # loss and metrics, bit for bit
    assert all((ga[n] is None and gb[n] is None) or torch.equal(ga[n], gb[n]) for n in ga)
    assert any(g is not None for g in ga.values())


def test_shutdown_leaves_a_process_group_it_did_not_create(tmp_path, monkeypatch):
    """An in-process vLLM creates its own group (world 1) and destroys it at its shutdown:
    mars's shutdown must not destroy it first (vLLM then failed at exit with "Invalid
    process group specified")."""
    import torch.distributed as dist

    from mars.train import distributed as D

    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert D.init_distributed(device_kind="cpu").world_size == 1  # joins the existing group
        D.shutdown()
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


def test_bad_environment_and_arguments_are_named():
    from mars.train import distributed as D

    with pytest.raises(ValueError, match="RANK is not set"):
        D.init_distributed(env={"WORLD_SIZE": "2", "LOCAL_RANK": "0"}, device_kind="cpu")
    with pytest.raises(ValueError, match="RANK=5 is outside"):
        D.init_distributed(env={"WORLD_SIZE": "2", "RANK": "5", "LOCAL_RANK": "0"}, device_kind="cpu")
    with pytest.raises(ValueError, match="WORLD_SIZE='two' is not an integer"):
        D.init_distributed(env={"WORLD_SIZE": "two"}, device_kind="cpu")
    with pytest.raises(ValueError, match="MASTER_ADDR is not set"):
        D.init_distributed(env={"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}, device_kind="cpu")
    with pytest.raises(ValueError, match="device_kind"):
        D.init_distributed(device_kind="tpu")
    with pytest.raises(ValueError, match="5 prompts cannot be split evenly over 2 ranks"):
        D.shard_prompts(list(range(5)), D.DistInfo(rank=1, world_size=2))
    assert D.shard_prompts(list(range(6)), D.DistInfo(rank=1, world_size=2)) == [3, 4, 5]
    with pytest.raises(ValueError, match="dist.strategy must be one of ddp, fsdp2"):
        D.wrap_model(torch.nn.Linear(2, 2), D.DistInfo(), "zero3")
    assert [D.device_kind(d) for d in ("auto", "cpu", "cuda", "cuda:1")] == ["auto", "cpu", "cuda", "cuda"]
    info = D.DistInfo(rank=1, world_size=2)
    assert D.rank_seed(3, D.DistInfo()) == 3 and D.rank_seed(3, info) != 3
    assert D.rng_file("/x", info) == os.path.join("/x", "rng_state_rank1.pt")


def test_loop_helpers_of_the_integration(tmp_path):
    """_split(exact=True) gives every rank the same number of mini-batches; padding_row of
    one process; a checkpoint resumes with the process count that wrote it; extra files
    (the ranks' RNG files) are inside the atomic checkpoint and its marker."""
    pytest.importorskip("transformers")
    from mars.train import checkpoint as ckpt, distributed as D, loop, update as U
    from mars.train.config import ConfigError

    assert U._split(list(range(3)), 5) == [[0], [1], [2]]
    assert U._split(list(range(3)), 5, exact=True) == [[0], [1], [2], [], []]
    assert U._split([], 2, exact=True) == [[], []] and U._split([], 2) == [[]]
    assert U._split(list(range(7)), 2, exact=True) == U._split(list(range(7)), 2)
    assert D.padding_row([], D.DistInfo()) is None and D.padding_row(["a", "b"], D.DistInfo()) == "a"
    cfg = _cfg()
    policy, _, _ = _setup(cfg)
    d = ckpt.save_checkpoint(str(tmp_path), 1, model=policy.model, tokenizer=policy.tokenizer, config={},
                             data_cursor=0, seed=0, extra_files={"rng_state_rank0.pt": {"rank": 0},
                                                                 "rng_state_rank1.pt": {"rank": 1}})
    files = ckpt.read_trainer_state(d)["files"]
    assert {"rng_state_rank0.pt", "rng_state_rank1.pt", "rng_state.pt"} <= set(files)
    assert torch.load(os.path.join(d, "rng_state_rank1.pt"), weights_only=True) == {"rank": 1}
    loop._check_resume_world(d, 2)
    with pytest.raises(ConfigError, match="written by a 2-process run and this run has 1: resume with torchrun "
                                          "--nproc_per_node 2"):
        loop._check_resume_world(d, 1)
    with pytest.raises(ValueError, match="plain file name"):
        ckpt.save_checkpoint(str(tmp_path), 2, model=policy.model, tokenizer=policy.tokenizer, config={},
                             data_cursor=0, seed=0, extra_files={"../x.pt": 1})
    single = ckpt.save_checkpoint(str(tmp_path / "one"), 1, model=policy.model, tokenizer=policy.tokenizer,
                                  config={}, data_cursor=0, seed=0)
    loop._check_resume_world(single, 1)
    with pytest.raises(ConfigError, match="1-process run and this run has 2: resume with mars train --resume"):
        loop._check_resume_world(single, 2)
    # a checkpoint written before the dist section existed resumes (its defaults); another strategy does not
    from mars.train.config import to_dict

    old = {k: v for k, v in to_dict(cfg).items() if k != "dist"}
    loop._check_resume_config(cfg, {"step": 1, "config": old}, single)
    with pytest.raises(ConfigError, match="dist.strategy"):
        loop._check_resume_config(cfg, {"step": 1, "config": {**old, "dist": {**to_dict(cfg)["dist"],
                                                                               "strategy": "fsdp2"}}}, single)


def test_rng_state_round_trip_per_rank(tmp_path):
    import random

    from mars.train import distributed as D

    info = D.DistInfo()
    gen = torch.Generator().manual_seed(5)
    path = D.save_rng_state(str(tmp_path), info, {"shuffle": gen})
    assert os.path.basename(path) == "rng_state_rank0.pt"
    expect = (torch.rand(3), random.random(), torch.rand(2, generator=gen))
    torch.manual_seed(0)
    random.seed(0)
    gen2 = torch.Generator().manual_seed(0)
    D.load_rng_state(str(tmp_path), info, {"shuffle": gen2})
    got = (torch.rand(3), random.random(), torch.rand(2, generator=gen2))
    assert torch.equal(expect[0], got[0]) and expect[1] == got[1] and torch.equal(expect[2], got[2])
    with pytest.raises(ValueError, match="rng_state_rank1.pt not found"):
        D.load_rng_state(str(tmp_path), D.DistInfo(rank=1, world_size=2))
