"""What an RL step measured: the ``metrics.jsonl`` record (docs/train.md).

``step_metrics`` (rewards, accuracies, advantage statistics, lengths; per scene category:
``category_metrics``), ``evaluate`` (greedy held-out accuracy), and under data
parallelism ``reduce_metrics``: every key reduced over the ranks as the table
:data:`REDUCTIONS` says, with the local counts of ``local_weights`` (docs/distributed.md).
The phase times come from ``timer.PhaseTimer``.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from mars.rollout import GenerationRequest, SamplingConfig

from . import distributed, faults
from .config import TrainConfig
from .rollouts import Rollout
from .update import _pad_rows, engine_logprobs, rollout_is_weights

__all__ = ["step_metrics", "category_metrics", "rollout_is_metrics", "evaluate", "timed_evaluate", "REDUCTIONS",
           "local_weights", "reduce_metrics"]


# =============================================================================== one rank
def step_metrics(batch: list[Rollout], trained: list[Rollout], adv, stats, old_logp, cfg) -> dict:
    anchors = [r for r in batch if r.anchor]

    def mean(xs):
        xs = list(xs)
        return sum(xs) / len(xs) if xs else None

    m: dict[str, Any] = {
        "reward_multi": mean(r.reward for r in trained) if trained else 0.0,
        "reward_mono": mean(r.reward for r in anchors),
        "acc_multi": mean(r.accuracy for r in trained) if trained else 0.0,
        "acc_mono": mean(r.accuracy for r in anchors),
        "format_multi": mean(r.format for r in trained),
        "reward_errors": sum(r.error is not None for r in batch),
        "response_length": mean(len(r.completion.token_ids) for r in trained),
        "response_length_max": max((len(r.completion.token_ids) for r in trained), default=None),
        "anchor_response_length": mean(len(r.completion.token_ids) for r in anchors),
        "truncated_frac": mean(r.completion.finish_reason == "length" for r in trained),
        "gen_tokens": sum(len(r.completion.token_ids) for r in batch),
        "rollouts": len(trained), "anchors": len(anchors),
    }
    if stats is not None:
        gains = [g for g in stats.gain.tolist() if not math.isnan(g)]
        m.update(gain=mean(gains), pooled_std=float(stats.std.mean()),
                 frac_zero_std=float((stats.std == 0).float().mean()),
                 adv_mean=float(adv.mean()), adv_std=float(adv.std()) if adv.numel() > 1 else 0.0,
                 adv_abs_mean=float(adv.abs().mean()), adv_min=float(adv.min()), adv_max=float(adv.max()))
        # groups where plain GRPO has no signal (all G multi rewards equal)
        by_group: dict[str, set] = {}
        for r in trained:
            by_group.setdefault(r.group, set()).add(r.reward)
        m["frac_zero_std_multi"] = mean(len(v) == 1 for v in by_group.values())
        # advantage that reaches those groups (MARS: sign(gain); GRPO: 0)
        flat = [abs(float(a)) for r, a in zip(trained, adv.tolist()) if len(by_group[r.group]) == 1]
        m["adv_abs_mean_equal_groups"] = mean(flat)
    m.update(category_metrics(trained, anchors))
    diffs = [(torch.tensor(r.completion.logprobs) - lp).abs().mean().item()
             for r, lp in zip(trained, old_logp) if r.completion.logprobs is not None and len(lp)]
    m["rollout_logp_diff"] = mean(diffs)
    if cfg.loss.rollout_is != "off":
        m.update(rollout_is_metrics(trained, old_logp, cfg))
    return m


def category_metrics(trained: list[Rollout], anchors: list[Rollout]) -> dict:
    """Training accuracy per scene category (samples whose extra_info names one, as the
    embedded task's): ``acc_multi/{c}`` over the sampled rollouts, ``acc_source_{k}/{c}``
    over the greedy anchors of source k. What the anchors answer where GRPO's group has
    no signal is what MARS adds (docs/train.md)."""
    acc: dict[str, list[float]] = {}
    for r in trained + anchors:
        cat = r.sample.extra_info.get("category") if isinstance(r.sample.extra_info, dict) else None
        if cat is not None:
            key = "acc_multi" if not r.anchor else f"acc_source_{r.source}"
            acc.setdefault(f"{key}/{cat}", []).append(r.accuracy)
    return {k: sum(v) / len(v) for k, v in sorted(acc.items())}


def rollout_is_metrics(trained: list[Rollout], old_logp, cfg: TrainConfig) -> dict:
    """rollout_is_mean (mean weight over the valid tokens; a sequence weight counts once per
    token) and rollout_is_clipped_frac (share of those tokens whose weight the cap cut)."""
    rows = [(r, lp) for r, lp in zip(trained, old_logp) if len(lp)]
    if not rows:
        return {"rollout_is_mean": None, "rollout_is_clipped_frac": None}
    T = max(len(lp) for _, lp in rows)
    old = _pad_rows([lp for _, lp in rows], T, "cpu")
    eng = _pad_rows(engine_logprobs([r for r, _ in rows], cfg), T, "cpu")
    mask = _pad_rows([torch.ones(len(lp)) for _, lp in rows], T, "cpu").bool()
    w, clipped = rollout_is_weights(old, eng, mask, cfg.loss.rollout_is, cfg.loss.rollout_is_cap)
    if w.dim() == 1:
        w, clipped = w[:, None].expand_as(mask), clipped[:, None].expand_as(mask)
    return {"rollout_is_mean": float(w[mask].mean()), "rollout_is_clipped_frac": float(clipped[mask].float().mean())}


# =============================================================================== held-out evaluation
def evaluate(engine, samples, cfg: TrainConfig) -> dict:
    """Greedy held-out accuracy (mars.rewards.metrics): multi-source, each single source
    (eval.mono), and per scene category when the samples have one."""
    from mars.rewards.metrics import sample_metric

    mode = cfg.rollout.mono if cfg.rollout.mono != "none" else "duplicate"
    greedy = SamplingConfig(max_new_tokens=cfg.rollout.max_new_tokens)
    jobs = []
    for s in samples:
        jobs.append((s, None, s))
        if cfg.eval.mono:
            jobs += [(s, k, v) for k, v in enumerate(s.mono_variants(mode))]
    with faults.oom_hint("evaluation", cfg):
        out = engine.generate_ids([GenerationRequest(v, greedy) for _, _, v in jobs])
    acc: dict[str, list] = {}
    for (s, k, v), cs in zip(jobs, out):
        c = float(sample_metric(s.task, cs[0].text, s.ground_truth)["correct"])
        key = "eval_acc_multi" if k is None else f"eval_acc_source_{k}"
        acc.setdefault(key, []).append(c)
        cat = s.extra_info.get("category") if isinstance(s.extra_info, dict) else None
        if cat is not None:
            acc.setdefault(f"{key}/{cat}", []).append(c)
    return {k: sum(v) / len(v) for k, v in sorted(acc.items())}


def timed_evaluate(engine, samples, cfg: TrainConfig) -> dict:
    """:func:`evaluate`'s accuracies and ``time_eval``, the seconds it took."""
    t = time.perf_counter()
    acc = evaluate(engine, samples, cfg)
    return {**acc, "time_eval": time.perf_counter() - t}


# =============================================================================== across ranks
# How each key of a step's metrics record is reduced across ranks (docs/distributed.md):
#   ("sum",)            sum over ranks
#   ("mean", W)         mean weighted by the local count W of local_weights() (ranks with W = 0 add nothing)
#   ("max",) ("min",)   over ranks (the times: the slowest rank is the step's wall time)
#   ("std", M, W)       pooled sample std from each rank's (W, mean M, std) - exact
#   ("same",)           already global (computed from all-reduced numbers): rank 0's value
#   ("main",)           computed on rank 0 only (held-out evaluation): rank 0's value
# Keys of no entry (and no prefix rule) get the unweighted mean over the ranks that have them.
REDUCTIONS: dict[str, tuple] = {
    **{k: ("sum",) for k in ("reward_errors", "gen_tokens", "rollouts", "anchors", "prompts_skipped",
                             "groups_kept", "groups_drawn")},
    **{k: ("mean", "rollouts") for k in ("reward_multi", "acc_multi", "format_multi", "response_length",
                                         "truncated_frac", "adv_mean", "adv_abs_mean")},
    **{k: ("mean", "anchors") for k in ("reward_mono", "acc_mono", "anchor_response_length")},
    **{k: ("mean", "groups") for k in ("pooled_std", "frac_zero_std", "frac_zero_std_multi")},
    "gain": ("mean", "gain_groups"),
    "adv_abs_mean_equal_groups": ("mean", "equal_group_rollouts"),
    "rollout_logp_diff": ("mean", "logp_rows"),
    **{k: ("mean", "trained_tokens") for k in ("rollout_is_mean", "rollout_is_clipped_frac")},
    "adv_std": ("std", "adv_mean", "rollouts"),
    **{k: ("max",) for k in ("response_length_max", "adv_max", "elapsed", "warmup_time_s")},
    "adv_min": ("min",),
    **{k: ("same",) for k in ("step", "loss", "clip_frac_high", "clip_frac_low", "dual_clip_frac", "approx_kl",
                              "ref_kl", "grad_norm", "lr", "optimizer_steps", "gen_batches")},
}
PREFIX_REDUCTIONS = (("time_", ("max",)), ("eval_", ("main",)))


def local_weights(batch, trained, stats=None, old_logp=None) -> dict[str, int]:
    """The local counts behind the means of :func:`step_metrics`: rollouts (trained rows), anchors, groups (prompts of the advantage
    stats), gain_groups (groups with a finite gain), equal_group_rollouts (rollouts of
    groups whose rewards are all equal), logp_rows (rows with engine log-probs and >= 1
    token), trained_tokens (tokens of the trained rows: loss.rollout_is's metrics). Pass it
    to :func:`reduce_metrics` as ``weights``."""
    by_group: dict[str, set] = {}
    for r in trained:
        by_group.setdefault(r.group, set()).add(r.reward)
    w = {"rollouts": len(trained), "anchors": sum(bool(r.anchor) for r in batch),
         "groups": 0, "gain_groups": 0,
         "equal_group_rollouts": sum(len(by_group[r.group]) == 1 for r in trained),
         "logp_rows": sum(r.completion.logprobs is not None and len(lp) > 0
                          for r, lp in zip(trained, old_logp or [])),
         "trained_tokens": sum(len(lp) for lp in old_logp or [])}
    if stats is not None:
        w["groups"] = int(stats.std.numel())
        w["gain_groups"] = sum(not math.isnan(g) for g in stats.gain.tolist())
    return w


def _reduce_key(key: str, vals: list, weights: list[dict], recs: list[dict]):
    rule = REDUCTIONS.get(key)
    if rule is None:
        rule = next((r for p, r in PREFIX_REDUCTIONS if key.startswith(p)), ("unweighted",))
    present = [(i, v) for i, v in enumerate(vals) if v is not None]
    kind = rule[0]
    if kind in ("same", "main"):
        return vals[0] if vals[0] is not None or kind == "main" else (present[0][1] if present else None)
    if not present:
        return None
    if kind == "sum":
        s = sum(v for _, v in present)
        return int(s) if all(isinstance(v, int) and not isinstance(v, bool) for _, v in present) else s
    if kind == "max":
        return max(v for _, v in present)
    if kind == "min":
        return min(v for _, v in present)
    if kind == "mean":
        ws = [(weights[i].get(rule[1], 0), v) for i, v in present]
        total = sum(w for w, _ in ws)
        return vals[0] if total == 0 else sum(w * v for w, v in ws) / total
    if kind == "std":
        mkey, wkey = rule[1], rule[2]
        parts = [(weights[i].get(wkey, 0), recs[i].get(mkey), v) for i, v in present]
        parts = [(n, m, s) for n, m, s in parts if n > 0 and m is not None]
        N = sum(n for n, _, _ in parts)
        if N <= 1:
            return 0.0 if N == 1 else vals[0]
        M = sum(n * m for n, m, _ in parts) / N
        ss = sum((n - 1) * s * s + n * (m - M) ** 2 for n, m, s in parts)
        return math.sqrt(max(ss, 0.0) / (N - 1))
    return sum(v for _, v in present) / len(present)


def reduce_metrics(record: dict, info: distributed.DistInfo | None = None, weights: dict | None = None, *,
                   check_same: bool = False) -> dict:
    """The step's record over all ranks, on every rank (rank 0 logs it): every key reduced
    as :data:`REDUCTIONS` says, with ``weights`` (:func:`local_weights` of this rank) for the
    weighted means; ``tokens_per_s`` recomputed as gen_tokens / time_step of the reduced
    record. One ``all_gather_object`` of the small dicts. Keys present on some ranks only
    (eval_* on rank 0) are reduced over the ranks that have them. check_same: raise
    ValueError naming a "same" key whose ranks disagree (a desynchronised run). For one
    process: a copy of ``record``."""
    info = info or distributed.current()
    if not info.distributed:
        return dict(record)
    recs, ws = zip(*distributed.all_gather_objects((dict(record), dict(weights or {})), info))
    keys = list(dict.fromkeys(k for r in recs for k in r))
    out = {}
    for key in keys:
        vals = [r.get(key) for r in recs]
        if check_same and REDUCTIONS.get(key) == ("same",):
            present = [v for v in vals if v is not None]
            if any(v != present[0] for v in present):
                raise ValueError(f"metric {key!r} should be equal on every rank but is {vals}")
        out[key] = _reduce_key(key, vals, list(ws), list(recs))
    if "tokens_per_s" in out and out.get("gen_tokens") is not None and out.get("time_step"):
        out["tokens_per_s"] = out["gen_tokens"] / max(out["time_step"], 1e-9)
    return out
