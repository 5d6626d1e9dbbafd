"""The torchrun worker of the distributed tests (tests/test_train_distributed.py,
tests/test_train_distributed_runs.py) and the helpers they share: a tiny embedded-task
policy, one step's batch the same on every rank, gradients and parameters to compare.

``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_worker.py
SCENARIO OUT_DIR`` runs ``_worker`` on every rank; each rank writes
``OUT_DIR/SCENARIO_rank{r}.json`` with what it measured and the tests assert on those
numbers (``_torchrun`` launches it and reads them back). The scenarios: "main" (gradients,
AdamW step, FSDP2, unused parameters, metrics, the first half of the resume check),
"resume" (a fresh pair of processes going on from the checkpoint), "train" (``loop.train``
with a rollout engine seeded per prompt, so one and two processes generate the same
rollouts; also run in one process: ``python tests/dist_worker.py train OUT_DIR``),
"train_fsdp2", and "signal" / "signal_resume" (SIGTERM to one rank mid-step, then resume).
Not a test file: pytest collects nothing here.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time

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


# =============================================================================== the launcher
def _torchrun(scenario: str, out_dir) -> tuple[list[dict], float]:
    """Runs ``scenario`` on 2 ranks under torchrun; (the ranks' json records, wall seconds)."""
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


if __name__ == "__main__":  # the torchrun worker
    sys.path.insert(0, ROOT)
    _worker(sys.argv[1], sys.argv[2])
