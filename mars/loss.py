"""`mars.loss`: the clipped-ratio token loss of SPEC section 3 (policy_loss, MarsLoss).

Every backend computes `mars.reference.policy_loss`. The kernels ("cpu", "cuda", "triton")
are one op, `mars::policy_loss` (`mars::policy_loss_triton`), whose forward reads the
inputs once and returns, besides the loss and the metrics, d(sum of row losses)/d(logp)
per token and a per-row scale (the aggregation weight): backward is one multiply.
"""
from __future__ import annotations

import torch
from torch import nn

from . import _ext, reference
from .backends import resolve
from .reference import KL_TYPES, LOSS_AGGS, LOSS_METRICS, LossOutput, check_policy_loss_args

__all__ = ["policy_loss", "MarsLoss", "LossOutput", "LOSS_AGGS", "KL_TYPES", "policy_loss_parts",
           "fused_linear_policy_loss", "FusedLinearMarsLoss", "token_logprobs"]


def _kernel(name: str):
    if name == "triton":
        return torch.ops.mars.policy_loss_triton
    return torch.ops.mars.policy_loss  # "cpu" / "cuda": dispatched by device


def _as_arg(v):
    """(float passed to the kernel, tensor to divide by afterwards or None). A tensor
    normaliser (e.g. an all-reduced count) is applied outside the op: no host sync."""
    if v is None:
        return -1.0, None
    if isinstance(v, torch.Tensor):
        return 1.0, v.reshape(())
    return float(v), None


def _prepare(logp, old_logp, advantages, mask, ref_logp, opts):
    """Validated, dtype-unified kernel arguments. opts: the keyword options."""
    if old_logp is None:
        old_logp = logp.detach()
    check_policy_loss_args(logp, old_logp, advantages, mask, ref_logp, **opts)
    # One dtype for the kernel: logp's when every input has it (bf16 is read as bf16),
    # else the compute dtype (fp32; fp64 for fp64 logp), to which the reference casts too:
    # fp32 advantages are not rounded to bf16, fp64 old_logp does not make an fp64 loss.
    others = [t for t in (old_logp, advantages, ref_logp) if t is not None]
    dtype = logp.dtype
    if any(t.dtype != dtype for t in others):
        dtype = torch.float64 if dtype == torch.float64 else torch.float32
    logp = logp if logp.dtype == dtype else logp.to(dtype)  # autograd casts the grad back
    old_logp = old_logp.detach().to(dtype)
    ref_logp = None if ref_logp is None else ref_logp.detach().to(dtype)
    advantages = advantages.detach().to(dtype)
    mask = mask if mask.dtype == torch.bool else mask != 0
    nt, nt_t = _as_arg(opts["num_tokens"])
    ns, ns_t = _as_arg(opts["num_seqs"])
    # loss_scale default T, at least 1 (T = 0 gives loss 0, not 0 / 0), as the reference
    ls, ls_t = _as_arg(max(logp.shape[1], 1) if opts["loss_scale"] is None else opts["loss_scale"])
    clamp = opts["log_ratio_clamp"]
    args = (logp, old_logp, advantages, mask, ref_logp, float(opts["clip_low"]),
            float(opts["clip_high"]), -1.0 if opts["dual_clip"] is None else float(opts["dual_clip"]),
            float(opts["kl_coef"]), KL_TYPES.index(opts["kl_type"]), LOSS_AGGS.index(opts["agg"]),
            nt, ns, ls, opts["ratio_level"] == "sequence", -1.0 if clamp is None else float(clamp))
    agg = opts["agg"]
    divisors = [d for d, used in ((nt_t, agg == "token-mean"),
                                  (ns_t, agg.startswith("seq-mean")),
                                  (ls_t, agg == "seq-mean-token-sum-norm")) if used and d is not None]
    return args, divisors


def policy_loss_parts(logp, old_logp, advantages, mask, *, ref_logp=None, clip_low=0.2,
                      clip_high=0.2, dual_clip=None, kl_coef=0.0, kl_type="k3",
                      agg="token-mean", num_tokens=None, num_seqs=None, loss_scale=None,
                      ratio_level="token", log_ratio_clamp=20.0, backend="auto"):
    """Building block for fused losses: the loss, metrics and d(loss)/d(logp) from one kernel,
    without autograd.

    Returns (loss 0-dim, metrics [6] in LOSS_METRICS order, dlogp [B, T]) where
    dlogp = d(loss)/d(logp), already scaled by the aggregation (fp32; fp64 for fp64 logp),
    0 under the mask. Options as policy_loss; backend must not be "reference"."""
    opts = dict(clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, kl_coef=kl_coef,
                kl_type=kl_type, agg=agg, num_tokens=num_tokens, num_seqs=num_seqs,
                loss_scale=loss_scale, ratio_level=ratio_level, log_ratio_clamp=log_ratio_clamp)
    with torch.no_grad():
        args, divisors = _prepare(logp, old_logp, advantages, mask, ref_logp, opts)
        name = resolve(backend, logp.device)
        if name == "reference":
            raise ValueError("policy_loss_parts needs a kernel backend (cpu, cuda or triton)")
        loss, metrics, grad, row_scale = _kernel(name)(*args)
        scale = row_scale
        for d in divisors:
            loss = loss / d
            scale = scale / d.to(scale.device, scale.dtype)
        return loss, metrics, grad * scale[:, None]


def policy_loss(logp, old_logp, advantages, mask, *, ref_logp=None, clip_low=0.2,
                clip_high=0.2, dual_clip=None, kl_coef=0.0, kl_type="k3", agg="token-mean",
                num_tokens=None, num_seqs=None, loss_scale=None, ratio_level="token",
                log_ratio_clamp=20.0, backend="auto") -> LossOutput:
    """Clipped-ratio token loss of SPEC section 3 with its metrics (SPEC section 9).

    Args:
        logp: [B, T] log-probs of the chosen tokens under the current policy (requires grad).
        old_logp: [B, T] log-probs under the sampling policy (None: on-policy, logp.detach()).
        advantages: [B] (broadcast over tokens inside the kernel) or [B, T].
        mask: [B, T] bool or 0/1. Masked positions may hold anything (-inf, NaN).
        ref_logp: [B, T] reference-policy log-probs, required when kl_coef > 0.
        clip_low, clip_high: ratio clipped to [1 - clip_low, 1 + clip_high].
        dual_clip: None or c > 1: for A < 0 the loss is at most -A c (verl c = 3).
        kl_coef, kl_type: adds kl_coef * KL per token, "k1" | "k2" | "k3" (verl's numerics).
        agg: one of LOSS_AGGS (see mars.reference.aggregate_loss).
        num_tokens, num_seqs, loss_scale: global normalisers (numbers or tensors) so that
            micro-batches / data-parallel ranks sum to the whole batch's gradient.
        ratio_level: "token" or "sequence" (GSPO: ratio of the mean log-ratio of the row).
        log_ratio_clamp: clamp of the log-ratio before exp (20, verl); None turns it off.
        backend: "auto" | "reference" | "cpu" | "cuda" | "triton".

    Returns:
        LossOutput(loss: 0-dim float32 (float64 for float64 logp), metrics: dict of 0-dim
        tensors clip_frac_high, clip_frac_low, dual_clip_frac, approx_kl, ref_kl,
        num_tokens). Computed in fp32 for bf16/fp16, deterministic, no host sync.
    """
    opts = dict(clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, kl_coef=kl_coef,
                kl_type=kl_type, agg=agg, num_tokens=num_tokens, num_seqs=num_seqs,
                loss_scale=loss_scale, ratio_level=ratio_level, log_ratio_clamp=log_ratio_clamp)
    name = resolve(backend, logp.device if isinstance(logp, torch.Tensor) else torch.device("cpu"))
    if name == "reference":
        return reference.policy_loss(logp, old_logp, advantages, mask, ref_logp=ref_logp, **opts)
    if name == "triton" and logp.device.type == "cpu" and not _ext.triton_interpret():
        raise RuntimeError("backend 'triton' on CPU tensors needs TRITON_INTERPRET=1")
    args, divisors = _prepare(logp, old_logp, advantages, mask, ref_logp, opts)
    loss, metrics, _, _ = _kernel(name)(*args)
    for d in divisors:
        loss = loss / d
    metrics = metrics.detach()
    return LossOutput(loss, {k: metrics[j] for j, k in enumerate(LOSS_METRICS)})


class MarsLoss(nn.Module):
    """`policy_loss` as a module: options fixed at construction (see policy_loss).

    >>> crit = mars.loss.MarsLoss(clip_high=0.28, agg="token-mean")
    >>> out = crit(logp, old_logp, advantages, mask); out.loss.backward()
    """

    def __init__(self, *, clip_low=0.2, clip_high=0.2, dual_clip=None, kl_coef=0.0,
                 kl_type="k3", agg="token-mean", loss_scale=None, ratio_level="token",
                 log_ratio_clamp=20.0, backend="auto"):
        super().__init__()
        self.options = dict(clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
                            kl_coef=kl_coef, kl_type=kl_type, agg=agg, loss_scale=loss_scale,
                            ratio_level=ratio_level, log_ratio_clamp=log_ratio_clamp,
                            backend=backend)
        check_policy_loss_args(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1),
                               torch.ones(1, 1), torch.zeros(1, 1) if kl_coef else None,
                               num_tokens=None, num_seqs=None,
                               **{k: v for k, v in self.options.items() if k != "backend"})

    def forward(self, logp, old_logp, advantages, mask, ref_logp=None, num_tokens=None,
                num_seqs=None) -> LossOutput:
        return policy_loss(logp, old_logp, advantages, mask, ref_logp=ref_logp,
                           num_tokens=num_tokens, num_seqs=num_seqs, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


# SPEC section 4, in its own module; it imports this one only inside its functions.
from .fused_linear import FusedLinearMarsLoss, fused_linear_policy_loss, token_logprobs  # noqa: E402
