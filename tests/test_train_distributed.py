"""Data parallel building blocks (mars/train/distributed.py): 2 CPU processes under
torchrun (gloo) against one process on the same whole batch.

The file is also the worker: ``python -m torch.distributed.run --standalone
--nproc_per_node 2 tests/test_train_distributed.py SCENARIO OUT_DIR`` runs ``_worker``
on every rank; each rank writes ``OUT_DIR/SCENARIO_rank{r}.json`` with what it measured
and the tests assert on those numbers. Two launches in all (about 10 s each on a quiet
2-core CPU): "main" (gradients, AdamW step, FSDP2, unused parameters, metrics, the first
half of the resume check) and "resume" (a fresh pair of processes going on from the
checkpoint). ``test_torchrun_mars_train_resume_bit_exact`` runs the whole ``mars train``
under torchrun (about 15-30 s); ``test_mars_train_two_processes_equal_one`` runs
``loop.train`` in one process and in two ("train": a rollout engine seeded per prompt, so
both runs generate the same rollouts) and compares the logged steps and the weights; the
tests after it stop a 2-process run with SIGTERM to one rank and resume it ("signal",
"signal_resume") and run it with FSDP2 ("train_fsdp2"). In all 9 launches, about 2 min on
a shared 2-core CPU.

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

import copy
import json
import os
import subprocess
import sys
import time

import pytest
import torch

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))
P, G, M = 4, 4, 2          # prompts per step, rollouts per prompt, anchors per prompt
AGGS = ("token-mean", "seq-mean-token-mean", "token-sum")


# =============================================================================== shared helpers
def _cfg(*overrides):
    from mars.train.config import load_config

    # the update tests compare one AdamW step (one mini-batch) at the learning rate their bounds assume
    return load_config(None, ["warmup.steps=0", "threads=1", "loss.kl_coef=0.0", "optim.mini_batches=1",
                              "optim.lr=1e-4", *overrides])


def _setup(cfg):
    from mars.rollout.encode import PromptEncoder
    from mars.train import task as embedded
    from mars.train.policy import build_policy

    policy = build_policy(cfg, torch.device("cpu"))
    enc = PromptEncoder(tokenizer=policy.tokenizer, image_processor=policy.image_processor)
    task = embedded.EmbeddedTask(cfg.task.mix, cfg.task.image_size, cfg.task.noise, seed=0)
    return policy, enc, task


def _batch(enc, task, vocab: int, step: int, text_only_from: int | None = None):
    """The step's prompts and rows (rollouts + anchors), the same on every rank: lengths
    0..8 (a 0-length rollout included), rewards in {0, .5, 1}, engine log-probs.
    text_only_from: prompts from this index on carry no image (the vision tower unused)."""
    from mars.rollout import Completion
    from mars.rollout.encode import EncodedPrompt
    from mars.train.rollouts import Rollout

    g = torch.Generator().manual_seed(1000 + step)
    prompts = [(f"s{step}p{i}", task.sample(step * P + i)) for i in range(P)]
    rows = []
    for i, (gid, s) in enumerate(prompts):
        p = enc.encode(s)
        if text_only_from is not None and i >= text_only_from:
            ids = p.input_ids[p.mm_token_type_ids == 0]
            p = EncodedPrompt(ids, torch.zeros_like(ids), None, None)
        for j in range(G + M):
            L = 0 if (i, j) == (0, 1) else int(torch.randint(1, 9, (1,), generator=g))
            tok = torch.randint(8, vocab, (L,), generator=g).tolist()
            lp = (torch.randn(L, generator=g) * 0.5 - 4.0).tolist()
            c = Completion(tok, "", lp, "length" if L == 8 else "stop")
            r = float(torch.randint(0, 3, (1,), generator=g)) * 0.5
            if j < G:
                rows.append(Rollout(gid, f"{gid}/r{j}", s, p, c, reward=r, accuracy=r, format=0.5))
            else:
                rows.append(Rollout(gid, f"{gid}/mono{j - G}", s, None, c, anchor=True, source=j - G, reward=r,
                                    accuracy=r))
    return prompts, rows


def _train_inputs(rows, cfg):
    """(trained rows, advantages, old log-probs, AdvantageOutput) of ``rows``."""
    from mars.train.advantages import compute_advantages

    trained = [r for r in rows if not r.anchor]
    out, _ = compute_advantages(rows, cfg)
    old = [torch.tensor(r.completion.logprobs, dtype=torch.float32) + 0.3 for r in trained]
    return trained, out.advantages, old, out


def _grads(model):
    return {n: (None if p.grad is None else (p.grad.full_tensor() if hasattr(p.grad, "full_tensor")
                                              else p.grad).detach().clone())
            for n, p in model.named_parameters()}


def _max_diff(a: dict, b: dict) -> tuple[float, float, int]:
    """(max |a - b| over all parameters, max |b|, count of parameters whose grad is None
    in one and not in the other)."""
    worst, scale, mismatch = 0.0, 0.0, 0
    for k in b:
        if (a[k] is None) != (b[k] is None):
            mismatch += 1
        elif b[k] is not None:
            worst = max(worst, float((a[k] - b[k]).abs().max()))
            scale = max(scale, float(b[k].abs().max()))
    return worst, scale, mismatch


def _params(model) -> dict:
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}


def _ddp_vs_one_process(base, enc, task, V, cfg, c, pad, cpu, info, *, step, text_only_from):
    """One step's batch: the whole batch's gradient in one process (update.accumulate_gradients)
    vs this rank's shard through DDP (find_unused_parameters). Returns (_max_diff of the
    two, the one-process grads, the DDP model, this rank's (rows, adv, old_logp))."""
    from mars.train import distributed as D, update as U
    prompts, rows = _batch(enc, task, V, step=step, text_only_from=text_only_from)
    local = [r for r in rows if r.group in {g for g, _ in D.shard_prompts(prompts, info)}]
    tr_all, adv_all, old_all, _ = _train_inputs(rows, cfg)
    tr, adv, old, _ = _train_inputs(local, cfg)
    ref = copy.deepcopy(base)
    U.accumulate_gradients(ref, tr_all, adv_all, old_all, None, c, pad, cpu)
    g_ref = _grads(ref)
    ddp = D.wrap_model(copy.deepcopy(base), info, "ddp", find_unused_parameters=True)
    U.accumulate_gradients(ddp, tr, adv, old, None, c, pad, cpu, info=info)
    return _max_diff(_grads(D.unwrap(ddp)), g_ref), g_ref, ddp, (tr, adv, old)


def _optimizer(params, cfg):
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                            weight_decay=cfg.optim.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0)
    return opt, sched


# =============================================================================== the worker
def _worker(scenario: str, out_dir: str) -> None:
    from mars.train import distributed as D

    torch.set_num_threads(1)
    info = D.init_distributed(device_kind="cpu")
    res: dict = {"rank": info.rank, "world_size": info.world_size, "backend": info.backend}
    cpu = torch.device("cpu")
    try:
        if scenario == "main":
            _main(info, res, cpu, out_dir)
        elif scenario == "resume":
            _resume_second(info, res, cpu, out_dir)
        elif scenario == "train":
            _train_run(info, res, out_dir)
        elif scenario == "train_fsdp2":
            _train_run(info, res, out_dir, "fsdp2", extra=("dist.strategy=fsdp2",))
        elif scenario in ("signal", "signal_resume"):
            _signal_run(info, res, out_dir, resume=scenario == "signal_resume")
        else:
            raise ValueError(scenario)
    finally:
        with open(os.path.join(out_dir, f"{scenario}_rank{info.rank}.json"), "w") as f:
            json.dump(res, f, indent=1)
        D.shutdown()


def _main(info, res, cpu, out_dir):
    from mars.train import distributed as D, metrics as M, update as U, advantages as A
    from mars.train.logger import NullLogger

    cfg = _cfg()
    policy, enc, task = _setup(cfg)
    base = policy.model
    V = len(policy.tokenizer)
    prompts, rows = _batch(enc, task, V, step=1)
    mine = {g for g, _ in D.shard_prompts(prompts, info)}
    local = [r for r in rows if r.group in mine]
    res["local_prompts"] = sorted(mine)
    tr_all, adv_all, old_all, st_all = _train_inputs(rows, cfg)
    tr, adv, old, st = _train_inputs(local, cfg)
    # the advantage of a rank's prompts needs no gather: the same numbers as the whole batch's
    whole = {r.uid: float(a) for r, a in zip(tr_all, adv_all)}
    res["adv_max_diff"] = max(abs(whole[r.uid] - float(a)) for r, a in zip(tr, adv))
    pad = enc.pad_token_id
    k = len(tr)

    # (1) gradients: split over 2 ranks vs one process
    res["grads"] = {}
    for agg in AGGS:
        c_whole = _cfg(f"loss.agg={agg}", "optim.micro_batch_size=64")
        c_split = _cfg(f"loss.agg={agg}", f"optim.micro_batch_size={k}")
        ref = copy.deepcopy(base)
        ref.zero_grad(set_to_none=True)
        l_whole, m_whole = U.accumulate_gradients(ref, tr_all, adv_all, old_all, None, c_whole, pad, cpu)
        g_whole = _grads(ref)
        ref.zero_grad(set_to_none=True)
        l_split, _ = U.accumulate_gradients(ref, tr_all, adv_all, old_all, None, c_split, pad, cpu)
        g_same_mb = _grads(ref)
        ddp = D.wrap_model(copy.deepcopy(base), info, "ddp")
        l_dp, m_dp = U.accumulate_gradients(ddp, tr, adv, old, None, c_whole, pad, cpu, info=info)
        g_dp = _grads(D.unwrap(ddp))
        same = _max_diff(g_dp, g_same_mb)
        vs_whole = _max_diff(g_dp, g_whole)
        res["grads"][agg] = {
            "bit_equal_same_micro_batches": all(
                (g_dp[n] is None and g_same_mb[n] is None) or torch.equal(g_dp[n], g_same_mb[n]) for n in g_dp),
            "max_diff_same_mb": same[0], "max_diff_whole": vs_whole[0], "scale": vs_whole[1],
            "none_mismatch": vs_whole[2] + same[2],
            "loss_dp": l_dp, "loss_whole": l_whole, "loss_split": l_split,
            "metrics_dp": m_dp, "metrics_whole": m_whole,
            "replica_max_diff_grad": _replica_grad_diff(D.unwrap(ddp), info),
        }
        # the same with the loss multiplier forgotten: the gradient is half the batch's
        if agg == "token-mean":
            ddp.zero_grad(set_to_none=True)
            orig = D.loss_multiplier
            D.loss_multiplier = lambda model, info=None: 1.0
            try:
                U.accumulate_gradients(ddp, tr, adv, old, None, c_whole, pad, cpu, info=info)
            finally:
                D.loss_multiplier = orig
            w, s, _ = _max_diff(_grads(D.unwrap(ddp)), g_whole)
            res["grads"][agg]["without_multiplier_rel"] = w / s

    # (2) one AdamW step through update.policy_update: 2 ranks vs one process
    c = _cfg("optim.micro_batch_size=64")
    ref = copy.deepcopy(base)
    opt, sched = _optimizer(ref.parameters(), c)
    t = time.perf_counter()
    upd_ref = U.policy_update(ref, opt, sched, tr_all, adv_all, old_all, None, c, pad, cpu,
                              torch.Generator().manual_seed(0))
    res["time_update_1proc_whole_batch"] = time.perf_counter() - t
    ddp = D.wrap_model(copy.deepcopy(base), info, "ddp")
    opt, sched = _optimizer(ddp.parameters(), c)
    t = time.perf_counter()
    upd_dp = U.policy_update(ddp, opt, sched, tr, adv, old, None, c, pad, cpu,
                             torch.Generator().manual_seed(0))
    res["time_update_2proc_half_batch"] = time.perf_counter() - t
    w_ref, w_dp = _params(ref), _params(D.unwrap(ddp))
    w0 = _params(base)
    res["adamw"] = {"replica_max_diff": D.replica_max_diff(ddp, info),
                    "max_diff_vs_1proc": max(float((w_dp[n] - w_ref[n]).abs().max()) for n in w_ref),
                    "max_update": max(float((w_ref[n] - w0[n]).abs().max()) for n in w_ref),
                    "upd_dp": upd_dp, "upd_ref": upd_ref}

    # (2a) a rank without rows (dynamic sampling kept none of its groups) still takes part in every
    # optimizer step: exactly optim.mini_batches mini-batches (_split exact), each a padding micro-batch
    # of rank 0's first row (padding_row, broadcast) adding 0; the update is one process's on rank 0's rows
    c2 = _cfg("optim.micro_batch_size=64", "optim.mini_batches=2")
    g0 = {g for g, _ in D.shard_prompts(prompts, D.DistInfo(rank=0, world_size=2))}
    tr0, adv0, old0, _ = _train_inputs([r for r in rows if r.group in g0], cfg)
    ref = copy.deepcopy(base)
    opt, sched = _optimizer(ref.parameters(), c2)
    upd_ref = U.policy_update(ref, opt, sched, tr0, adv0, old0, None, c2, pad, cpu,
                              torch.Generator().manual_seed(0))
    ddp = D.wrap_model(copy.deepcopy(base), info, "ddp")
    opt, sched = _optimizer(ddp.parameters(), c2)
    mine_rows = (tr0, adv0, old0) if info.is_main else ([], adv0[:0], [])
    dummy = D.padding_row(mine_rows[0], info)
    upd_dp = U.policy_update(ddp, opt, sched, *mine_rows, None, c2, pad, cpu, torch.Generator().manual_seed(0),
                             dummy=dummy)
    w_ref, w_dp = _params(ref), _params(D.unwrap(ddp))
    res["empty_rank"] = {"max_diff": max(float((w_dp[n] - w_ref[n]).abs().max()) for n in w_ref),
                         "moved": max(float((w_ref[n] - w0[n]).abs().max()) for n in w_ref),
                         "replica_max_diff": D.replica_max_diff(ddp, info),
                         "steps": [upd_dp["optimizer_steps"], upd_ref["optimizer_steps"]],
                         "loss": [upd_dp["loss"], upd_ref["loss"]], "grad_norm": [upd_dp["grad_norm"],
                                                                                 upd_ref["grad_norm"]]}

    # (2b) FSDP2 (fully_shard, gloo, CPU): gradients and the AdamW step (an error on one rank would
    # leave the other in a collective: no try here, the launch fails and the test shows the traceback)
    fs = D.wrap_model(copy.deepcopy(base), info, "fsdp2")
    c_f = _cfg("loss.agg=token-mean", "optim.micro_batch_size=3")  # unequal micro-batch counts are padded
    ref = copy.deepcopy(base)
    ref.zero_grad(set_to_none=True)
    U.accumulate_gradients(ref, tr_all, adv_all, old_all, None, _cfg("optim.micro_batch_size=64"), pad,
                           cpu)
    g_ref = _grads(ref)
    # rank 1 trains two rows fewer: 6 rows = 2 micro-batches of 3 against rank 0's 8 rows = 3; FSDP2's
    # forwards are collectives, so rank 1 runs one padding micro-batch (the dummy row, adding 0)
    sub = tr if info.rank == 0 else tr[:-2]
    sub_adv = adv if info.rank == 0 else adv[:-2]
    sub_old = old if info.rank == 0 else old[:-2]
    U.accumulate_gradients(fs, sub, sub_adv, sub_old, None, c_f, pad, cpu, info=info, dummy=tr[0])
    g_fs = _grads(D.unwrap(fs))
    # one process on exactly those rows (rank 1's last two rollouts left out on both sides)
    dropped = set(D.all_gather_objects([r.uid for r in tr[-2:]], info)[1])
    keep = [i for i, r in enumerate(tr_all) if r.uid not in dropped]
    ref2 = copy.deepcopy(base)
    ref2.zero_grad(set_to_none=True)
    U.accumulate_gradients(ref2, [tr_all[i] for i in keep], adv_all[keep], [old_all[i] for i in keep],
                           None, _cfg("optim.micro_batch_size=64"), pad, cpu)
    g_ref2 = _grads(ref2)
    d2 = _max_diff(g_fs, g_ref2)
    res["fsdp2"] = {"max_diff_uneven": d2[0], "scale_uneven": d2[1], "none_mismatch": d2[2],
                    "whole_vs_uneven_rel": _max_diff(g_ref, g_ref2)[0] / d2[1]}
    fs2 = D.wrap_model(copy.deepcopy(base), info, "fsdp2")
    opt, sched = _optimizer(fs2.parameters(), c)
    ref = copy.deepcopy(base)
    opt_r, sched_r = _optimizer(ref.parameters(), c)
    U.policy_update(ref, opt_r, sched_r, tr_all, adv_all, old_all, None, c, pad, cpu,
                    torch.Generator().manual_seed(0))
    upd_fs = U.policy_update(fs2, opt, sched, tr, adv, old, None, c, pad, cpu,
                             torch.Generator().manual_seed(0))
    w_fs = _params(D.unwrap(fs2))
    w_r = _params(ref)
    full = D.full_state_dict(fs2, info)
    res["fsdp2"].update(step_max_diff=max(float((w_fs[n] - w_r[n]).abs().max()) for n in w_r),
                        grad_norm=upd_fs["grad_norm"],
                        state_dict_max_diff=max(float((full[n] - w_r[n]).abs().max()) for n in w_r),
                        replica_max_diff=D.replica_max_diff(fs2, info))

    # (3) metrics: reduce(step_metrics of each rank's shard) vs step_metrics of the whole batch; rank 1
    # keeps one of its two prompts (as dynamic sampling may), so the ranks' counts differ and the weights
    # of the means matter
    kept = sorted(mine) if info.rank == 0 else sorted(mine)[:1]
    every = {g for ks in D.all_gather_objects(kept, info) for g in ks}
    rows_k = [r for r in rows if r.group in every]
    local_k = [r for r in local if r.group in kept]
    tr_all_k, adv_all_k, old_all_k, st_all_k = _train_inputs(rows_k, cfg)
    tr_k, adv_k, old_k, st_k = _train_inputs(local_k, cfg)
    m_all = M.step_metrics(rows_k, tr_all_k, adv_all_k, st_all_k, old_all_k, cfg)
    m_loc = M.step_metrics(local_k, tr_k, adv_k, st_k, old_k, cfg)
    m_unweighted = D.all_gather_objects(m_loc["reward_multi"], info)
    m_loc.update(step=1, time_step=1.0 + info.rank, time_update=0.5 * (1 + info.rank), tokens_per_s=0.0)
    if info.is_main:
        m_loc["eval_acc_multi"] = 0.75
    red = M.reduce_metrics(m_loc, info, M.local_weights(local_k, tr_k, st_k, old_k), check_same=True)
    res["metrics"] = {"reduced": red, "whole": m_all, "unweighted_reward_multi": sum(m_unweighted) / 2}

    # (3b) the small collectives the loop integration uses
    from mars.rollout import Completion
    from mars.train.rollouts import Rollout

    bad = Rollout("g", "g/r0", task.sample(0), None, Completion([1], "x"), error="boom")
    errors_path = os.path.join(out_dir, "errors.jsonl")
    if info.is_main:
        open(errors_path, "w").close()
    A.write_rank_errors([bad] if info.rank == 1 else [], _cfg(), 3, errors_path, info)
    gen = torch.Generator().manual_seed(100 + info.rank)
    files = D.gather_rng_files(info, {"shuffle": gen})
    expect = torch.rand(2, generator=gen).tolist()
    if info.is_main:
        for name, obj in files.items():
            torch.save(obj, os.path.join(out_dir, name))
    D.broadcast_object(None, info)  # the files are written
    gen2 = torch.Generator().manual_seed(0)
    D.load_rng_state(out_dir, info, {"shuffle": gen2})
    nl = NullLogger(out_dir)
    res["collectives"] = {
        "union": sorted(D.union_sets({info.rank, 10}, info)),
        "any_rank_1": D.any_rank(info.rank == 1, info), "any_rank_none": D.any_rank(False, info),
        "signal": D.agree_signal(15 if info.rank == 1 else None, info), "no_signal": D.agree_signal(None, info),
        "rng_files": None if files is None else sorted(files), "rng_restored": torch.rand(2, generator=gen2).tolist()
        == expect,
        "errors": open(errors_path).read().splitlines() if info.is_main else None,
        "null_logger": [nl.log({"step": 1, "x": 1.0}) == {"step": 1, "x": 1.0}, nl.plot() is None,
                        nl.path == os.path.join(out_dir, "metrics.jsonl"), len(nl.records)],
        "sync_copy_max_diff": None}
    # the padding row of a rank without rows: rank 0's first row, its prompt and completion only
    pad_row = D.padding_row(tr if info.is_main else [], info)
    res["collectives"]["padding_row"] = [pad_row.uid, pad_row.sample is None, list(pad_row.completion.token_ids),
                                         pad_row.prompt.input_ids.tolist(), D.padding_row([], info) is None]
    res["collectives"]["rank0_first"] = [tr[0].uid, list(tr[0].completion.token_ids),
                                         tr[0].prompt.input_ids.tolist()]
    copy_model = copy.deepcopy(base)
    D.sync_generation_copy(fs2, copy_model, info)
    full = D.full_state_dict(fs2, info)
    res["collectives"]["sync_copy_max_diff"] = max(float((full[n] - p.detach()).abs().max())
                                                   for n, p in copy_model.named_parameters())
    res["collectives"]["sync_copy_moved"] = max(float((p.detach() - w0[n]).abs().max())
                                                for n, p in copy_model.named_parameters())

    # (4) DDP and a vision tower unused on one rank (text-only prompts on rank 1): find_unused_parameters
    d, g_ref, ddp, _ = _ddp_vs_one_process(base, enc, task, V, cfg, c, pad, cpu, info, step=2,
                                           text_only_from=P // 2)
    res["unused"] = {"find_unused_max_diff": d[0], "scale": d[1], "none_mismatch": d[2],
                     "find_unused_replica_grad_diff": _replica_grad_diff(D.unwrap(ddp), info)}
    # (5) the first half of the resume check: 2 steps straight; 1 step + checkpoint
    res["resume"] = _resume_first(info, cpu, out_dir)

    # (6) a vision tower unused on every rank (all prompts text-only): with find_unused_parameters
    # its grads stay None, as in one process; without it DDP waits for them and silently reduces
    # nothing (last: that DDP object is unusable afterwards). Unused on one rank only, DDP without
    # find_unused_parameters launches different collectives on the two ranks: gloo aborts (or NCCL
    # hangs), which a test cannot do safely - docs/distributed.md.
    d, g_ref, ddp, (tr_n, adv_n, old_n) = _ddp_vs_one_process(base, enc, task, V, cfg, c, pad, cpu, info,
                                                              step=3, text_only_from=0)
    res["unused_all"] = {"find_unused_max_diff": d[0], "scale": d[1], "none_mismatch": d[2],
                         "vision_grads_none": sum(g is None for n, g in g_ref.items() if ".visual." in n),
                         "vision_params": sum(".visual." in n for n in g_ref)}
    ddp = D.wrap_model(copy.deepcopy(base), info, "ddp", find_unused_parameters=False)
    U.accumulate_gradients(ddp, tr_n, adv_n, old_n, None, c, pad, cpu, info=info)
    res["unused_all"]["no_find_unused_replica_grad_diff"] = _replica_grad_diff(D.unwrap(ddp), info)


def _replica_grad_diff(model, info) -> float:
    """max |grad_rank - grad_rank0| (None grads as zeros) without DDP: gathered."""
    from mars.train import distributed as D

    gs = [torch.zeros_like(p) if p.grad is None else p.grad.detach() for p in model.parameters()]
    flat = torch.cat([g.reshape(-1) for g in gs])
    allg = D.all_gather_objects(flat, info)
    return max(float((x - allg[0]).abs().max()) for x in allg)


# ------------------------------------------------------------------------------- loop.train, 1 vs 2 processes
TRAIN_ARGS = ["max_steps=3", "warmup.steps=3", "optim.prompts_per_step=4", "rollout.n=4", "optim.mini_batches=1",
              "optim.micro_batch_size=64", "eval.every=0", "task.eval_per_category=2", "log.progress=false",
              "log.plot_every=0", "model.device=cpu", "algorithm.dynamic_sampling=true",
              "algorithm.max_gen_batches=3", "log.samples_every=0", "rollout.mono=none"]


class _PerPromptSeeded:
    """A rollout engine whose responses depend on the prompt alone: the torch RNG is
    seeded from the sample id before each request, which is generated on its own. A
    2-process run, whose ranks generate disjoint halves of the prompts from their own
    streams, then generates exactly the rollouts of a 1-process run."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def generate_ids(self, requests):
        import zlib

        out = []
        for r in requests:
            torch.manual_seed(zlib.crc32(f"{r.sample.id}|{r.config.n}|{r.config.temperature}".encode()))
            out += self.inner.generate_ids([r])
        return out


def _train_run(info, res, out_dir, name: str | None = None, resume: bool = False, extra=()):
    """``loop.train`` (the integrated trainer: shards, DDP, reduced metrics, rank 0's
    files) with per-prompt seeded rollouts; records every rank's logged steps."""
    from mars.train import loop
    from mars.train.config import load_config

    real = loop.build_rollout_engine
    loop.build_rollout_engine = lambda name, policy, **kw: _PerPromptSeeded(real(name, policy, **kw))
    d = os.path.join(out_dir, name or f"train_w{info.world_size}")
    result = loop.train(load_config(None, [f"output_dir={d}", *TRAIN_ARGS, *extra]), resume=resume)
    res["records"] = result.records
    res["checkpoint"] = result.checkpoint
    res["files"] = sorted(os.listdir(d)) if info.is_main else None


def _signal_run(info, res, out_dir, resume: bool):
    """The "train" run with SIGTERM sent to rank 1 alone in the middle of step 2 (at the
    rollout kill point, before the update): the ranks agree on it after the step, both
    checkpoint step 2 and raise Interrupted; ``resume``: go on from that checkpoint."""
    import signal

    from mars.train import faults

    if not resume:
        def kill_point(point, step):
            if info.rank == 1 and point == "rollout" and step == 2:
                os.kill(os.getpid(), signal.SIGTERM)

        faults.kill_point = kill_point
    try:
        _train_run(info, res, out_dir, "signal", resume)
    except faults.Interrupted as exc:
        res["interrupted"] = [exc.signum, exc.step, exc.checkpoint]


# ------------------------------------------------------------------------------- resume
RESUME_STEPS = 2


def _resume_state(info, cpu):
    from mars.train import distributed as D

    cfg = _cfg("optim.micro_batch_size=3", "optim.mini_batches=2")
    policy, enc, task = _setup(cfg)
    model = D.wrap_model(policy.model, info, "ddp")
    opt, sched = _optimizer(model.parameters(), cfg)
    return cfg, policy, enc, task, model, opt, sched


def _rl_step(step, info, cfg, enc, task, V, model, opt, sched, shuffle, cpu) -> dict:
    """One step of the building blocks: the global prompts, this rank's shard, the
    advantage plus per-rank sampling noise (the rank's torch RNG: what generation
    consumes), the update through update.policy_update (mini-batches shuffled by the
    trainer's generator)."""
    from mars.train import distributed as D, update as U

    prompts, rows = _batch(enc, task, V, step)
    mine = {g for g, _ in D.shard_prompts(prompts, info)}
    tr, adv, old, _ = _train_inputs([r for r in rows if r.group in mine], cfg)
    adv = adv + 0.1 * torch.randn(adv.shape)
    return U.policy_update(model, opt, sched, tr, adv, old, None, cfg, enc.pad_token_id, cpu, shuffle)


def _resume_first(info, cpu, out_dir) -> dict:
    from mars.train import distributed as D

    out = {}
    for mode in ("straight", "first"):
        torch.manual_seed(D.rank_seed(7, info))
        cfg, policy, enc, task, model, opt, sched = _resume_state(info, cpu)
        shuffle = torch.Generator().manual_seed(7)
        V = len(policy.tokenizer)
        last = RESUME_STEPS if mode == "straight" else 1
        for step in range(1, last + 1):
            out[f"{mode}_loss_{step}"] = _rl_step(step, info, cfg, enc, task, V, model, opt, sched, shuffle,
                                                  cpu)["loss"]
        if mode == "straight":
            if info.is_main:
                torch.save(_params(D.unwrap(model)), os.path.join(out_dir, "straight_weights.pt"))
        else:
            ck = os.path.join(out_dir, "ckpt")
            D.save_rng_state(ck, info, {"shuffle": shuffle})
            if info.is_main:
                torch.save({"model": D.unwrap(model).state_dict(), "optimizer": opt.state_dict(),
                            "scheduler": sched.state_dict()}, os.path.join(ck, "state.pt"))
    return out


def _resume_second(info, res, cpu, out_dir):
    from mars.train import distributed as D

    torch.manual_seed(12345)  # anything: the checkpoint's RNG must win
    cfg, policy, enc, task, model, opt, sched = _resume_state(info, cpu)
    ck = os.path.join(out_dir, "ckpt")
    state = torch.load(os.path.join(ck, "state.pt"), weights_only=True) if info.is_main else None
    state = D.broadcast_object(state, info)  # rank 0 reads, every rank loads
    D.unwrap(model).load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    shuffle = torch.Generator().manual_seed(999)
    D.load_rng_state(ck, info, {"shuffle": shuffle})
    V = len(policy.tokenizer)
    for step in range(2, RESUME_STEPS + 1):
        res[f"resumed_loss_{step}"] = _rl_step(step, info, cfg, enc, task, V, model, opt, sched, shuffle, cpu)["loss"]
    w = _params(D.unwrap(model))
    ref = torch.load(os.path.join(out_dir, "straight_weights.pt"), weights_only=True)
    res["bit_equal_to_straight"] = all(torch.equal(w[n], ref[n]) for n in ref)
    res["max_diff_to_straight"] = max(float((w[n] - ref[n]).abs().max()) for n in ref)
    res["replica_max_diff"] = D.replica_max_diff(model, info)
    try:  # a 2-process checkpoint read by another world size is refused, naming it
        D.load_rng_state(ck, D.DistInfo(rank=info.rank, world_size=3))
    except ValueError as exc:
        res["world_size_error"] = str(exc)


# =============================================================================== the tests
def _torchrun(scenario: str, out_dir) -> tuple[list[dict], float]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("WORLD_SIZE", None)
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        HERE, scenario, str(out_dir)], env=env, capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - t
    assert p.returncode == 0, f"torchrun {scenario} failed:\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    out = []
    for r in range(2):
        with open(os.path.join(out_dir, f"{scenario}_rank{r}.json")) as f:
            out.append(json.load(f))
    return out, wall


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


if __name__ == "__main__":  # the torchrun worker
    sys.path.insert(0, ROOT)
    _worker(sys.argv[1], sys.argv[2])
