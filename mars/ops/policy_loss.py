"""The `mars::policy_loss` op behind `mars.loss.policy_loss` (docs/loss.md): argument
unification, the kernel call per backend and the reference fallback. `mars.loss` (the public
module) and `mars.fused_linear` both build on it, so neither imports the other.
"""
from __future__ import annotations

import torch

from . import _ext, reference
from .backends import resolve
from .reference import (CLIP_HIGH, CLIP_LOW, KL_CLAMP, KL_TYPES, LOG_RATIO_CLAMP, LOSS_AGGS, LOSS_METRICS, LossOutput,
                        check_policy_loss_args)

__all__ = ["policy_loss", "policy_loss_parts", "policy_loss_checked"]


def _kernel(name: str):
    if name == "triton":
        return torch.ops.mars.policy_loss_triton
    return torch.ops.mars.policy_loss  # "cpu" / "cuda": dispatched by device


def _as_arg(v):
    """(float passed to the kernel, tensor to divide by afterwards or None). A tensor
    normaliser (e.g. an all-reduced count) is applied outside the op, so the op needs no
    host value of it."""
    if v is None:
        return -1.0, None
    if isinstance(v, torch.Tensor):
        return 1.0, v
    return float(v), None


def _unify(logp, old_logp, advantages, mask, ref_logp, is_weights=None):
    """One dtype for the kernel: logp's when every input has it (bf16 is read as bf16),
    else the compute dtype (fp32; fp64 for fp64 logp), to which the reference casts too:
    fp32 advantages are not rounded to bf16, fp64 old_logp does not make an fp64 loss."""
    others = [t for t in (old_logp, advantages, ref_logp, is_weights) if t is not None]
    dtype = logp.dtype
    if any(t.dtype != dtype for t in others):
        dtype = torch.float64 if dtype == torch.float64 else torch.float32
    logp = logp if logp.dtype == dtype else logp.to(dtype)  # autograd casts the grad back
    old_logp = old_logp.detach().to(dtype)
    ref_logp = None if ref_logp is None else ref_logp.detach().to(dtype)
    advantages = advantages.detach().to(dtype)
    is_weights = None if is_weights is None else is_weights.detach().to(dtype)
    mask = mask if mask.dtype == torch.bool else mask != 0
    return logp, old_logp, advantages, mask, ref_logp, is_weights


def _kernel_args(logp, old_logp, advantages, mask, ref_logp, opts, is_weights=None):
    """(op arguments, tensor divisors applied after the op) from validated options
    (`check_policy_loss_args`'s result)."""
    logp, old_logp, advantages, mask, ref_logp, is_weights = _unify(
        logp, old_logp, advantages, mask, ref_logp, is_weights)
    nt, nt_t = _as_arg(opts["num_tokens"])
    ns, ns_t = _as_arg(opts["num_seqs"])
    # loss_scale default T, at least 1 (T = 0 gives loss 0, not 0 / 0), as the reference
    ls, ls_t = _as_arg(max(logp.shape[1], 1) if opts["loss_scale"] is None else opts["loss_scale"])
    clamp, dual = opts["log_ratio_clamp"], opts["dual_clip"]
    args = (logp, old_logp, advantages, mask, ref_logp, is_weights, opts["clip_low"],
            opts["clip_high"],
            -1.0 if dual is None else dual, opts["kl_coef"], KL_TYPES.index(opts["kl_type"]),
            LOSS_AGGS.index(opts["agg"]), nt, ns, ls, opts["ratio_level"] == "sequence",
            -1.0 if clamp is None else clamp,
            -1.0 if opts["kl_clamp"] is None else opts["kl_clamp"])
    agg = opts["agg"]
    divisors = [d for d, used in ((nt_t, agg == "token-mean"),
                                  (ns_t, agg.startswith("seq-mean")),
                                  (ls_t, agg == "seq-mean-token-sum-norm")) if used and d is not None]
    return args, divisors


def policy_loss_parts(logp, old_logp, advantages, mask, *, ref_logp=None, is_weights=None,
                      clip_low=CLIP_LOW, clip_high=CLIP_HIGH, dual_clip=None, kl_coef=0.0, kl_type="k3",
                      agg="token-mean", num_tokens=None, num_seqs=None, loss_scale=None,
                      ratio_level="token", log_ratio_clamp=LOG_RATIO_CLAMP, kl_clamp=KL_CLAMP,
                      backend="auto"):
    """Building block for fused losses: the loss, metrics and d(loss)/d(logp) from one kernel,
    without autograd.

    Returns (loss 0-dim, metrics [6] in LOSS_METRICS order, dlogp [B, T]) where
    dlogp = d(loss)/d(logp), already scaled by the aggregation (fp32; fp64 for fp64 logp),
    0 under the mask. Options as policy_loss; backend must not be "reference"."""
    with torch.no_grad():
        if old_logp is None:
            old_logp = logp.detach()
        opts = check_policy_loss_args(
            logp, old_logp, advantages, mask, ref_logp, clip_low=clip_low, clip_high=clip_high,
            dual_clip=dual_clip, kl_coef=kl_coef, kl_type=kl_type, agg=agg,
            num_tokens=num_tokens, num_seqs=num_seqs, loss_scale=loss_scale,
            ratio_level=ratio_level, log_ratio_clamp=log_ratio_clamp, is_weights=is_weights,
            kl_clamp=kl_clamp)
        name = resolve(backend, logp.device)
        if name == "reference":
            raise ValueError("policy_loss_parts needs a kernel backend (cpu, cuda or triton)")
        args, divisors = _kernel_args(logp, old_logp, advantages, mask, ref_logp, opts,
                                      is_weights)
        loss, metrics, grad, row_scale = _kernel(name)(*args)
        scale = row_scale
        for d in divisors:
            loss = loss / d
            scale = scale / d.to(scale.device, scale.dtype)
        return loss, metrics, grad * scale[:, None]


def policy_loss(logp, old_logp, advantages, mask, *, ref_logp=None, is_weights=None,
                clip_low=CLIP_LOW, clip_high=CLIP_HIGH, dual_clip=None, kl_coef=0.0, kl_type="k3",
                agg="token-mean", num_tokens=None, num_seqs=None, loss_scale=None,
                ratio_level="token", log_ratio_clamp=LOG_RATIO_CLAMP, kl_clamp=KL_CLAMP,
                backend="auto") -> LossOutput:
    """Clipped-ratio token loss with its metrics (docs/loss.md: formulas, options, ranges).

    Args:
        logp: [B, T] log-probs of the chosen tokens under the current policy (requires grad).
        old_logp: [B, T] log-probs under the sampling policy (None: on-policy, logp.detach()).
        advantages: [B] (broadcast over tokens inside the kernel) or [B, T].
        mask: [B, T] bool or 0/1. Masked positions may hold anything (-inf, NaN).
        ref_logp: [B, T] reference-policy log-probs, required when kl_coef > 0.
        is_weights: None or [B] / [B, T] importance-sampling weights (the engine/trainer
            mismatch correction: verl's rollout_is_weights, TRL's importance_sampling_ratio,
            Liger's vllm_is_ratio), data (no gradient), finite and >= 0 where the mask is
            set; they multiply the per-token policy term, not the KL term
            (docs/loss.md, "Importance-sampling weights").
        clip_low: in [0, 1); clip_high: >= 0 (inf: no upper clip). The ratio is clipped to
            [1 - clip_low, 1 + clip_high].
        dual_clip: None or a finite c > 1: for A < 0 the loss is at most -A c (verl c = 3).
        kl_coef: finite, >= 0; kl_type "k1" | "k2" | "k3" | "k3_ratio": adds kl_coef * KL
            per token (k3 with verl's clamps, computed without cancellation near 0;
            k3_ratio: k3 times the policy ratio, not detached, TRL's default
            use_bias_correction_kl; docs/loss.md, "KL estimators").
        kl_clamp: k3 (also inside k3_ratio) clamped to [-kl_clamp, kl_clamp], its
            d = ref_logp - logp to +-20, no gradient where a clamp bites: verl's low_var_kl
            (10, the default). None (or inf): no clamp, TRL's k3 = exp(d) - d - 1 (inf
            where exp(d) overflows the dtype). Any number > 0.
        agg: one of LOSS_AGGS (see mars.reference.aggregate_loss).
        num_tokens, num_seqs, loss_scale: global normalisers, numbers or one-element tensors
            (e.g. all-reduced), finite and > 0 (0 only when this micro-batch has no valid
            token: the loss is then 0), so that micro-batches / data-parallel ranks sum to
            the whole batch's gradient. Tensors on the GPU are checked with one host sync
            (docs/loss.md, "Global normalisers"); pass numbers to avoid it.
        ratio_level: "token" or "sequence" (GSPO: ratio of the mean log-ratio of the row).
        log_ratio_clamp: clamp of the log-ratio before exp (20, verl); None turns it off
            (an overflowing ratio is then handled as docs/loss.md, "Huge ratios", says).
        backend: "auto" | "reference" | "cpu" | "cuda" | "triton". Kernel backends give
            first-order gradients (a second backward through them raises a RuntimeError);
            "reference" supports higher-order gradients.

    Returns:
        LossOutput(loss: 0-dim float32 (float64 for float64 logp), metrics: dict of 0-dim
        tensors clip_frac_high, clip_frac_low, dual_clip_frac, approx_kl, ref_kl,
        num_tokens). Computed in fp32 for bf16/fp16, deterministic, no host sync (except
        the one above for GPU tensor normalisers). Bad options raise ValueError naming them.
    """
    name = resolve(backend, logp.device if isinstance(logp, torch.Tensor) else torch.device("cpu"))
    if old_logp is None and isinstance(logp, torch.Tensor):
        old_logp = logp.detach()
    opts = check_policy_loss_args(
        logp, old_logp, advantages, mask, ref_logp, clip_low=clip_low, clip_high=clip_high,
        dual_clip=dual_clip, kl_coef=kl_coef, kl_type=kl_type, agg=agg, num_tokens=num_tokens,
        num_seqs=num_seqs, loss_scale=loss_scale, ratio_level=ratio_level,
        log_ratio_clamp=log_ratio_clamp, is_weights=is_weights, kl_clamp=kl_clamp)
    return policy_loss_checked(name, logp, old_logp, advantages, mask, ref_logp, opts,
                               is_weights)


def policy_loss_checked(name, logp, old_logp, advantages, mask, ref_logp, opts,
                        is_weights=None) -> LossOutput:
    """`policy_loss` on backend `name` (resolved) with arguments already validated by
    `check_policy_loss_args` (opts: its result; old_logp not None). For fused losses that
    validated once up front."""
    if name == "reference":
        return reference.policy_loss_checked(logp, old_logp, advantages, mask, ref_logp, opts,
                                             is_weights)
    if name == "triton":
        _ext.require_triton_cpu(logp.device)
    args, divisors = _kernel_args(logp, old_logp, advantages, mask, ref_logp, opts, is_weights)
    loss, metrics, _, _ = _kernel(name)(*args)
    for d in divisors:
        loss = loss / d
    metrics = metrics.detach()
    return LossOutput(loss, {k: metrics[j] for j, k in enumerate(LOSS_METRICS)})
