"""`mars.loss`: the clipped-ratio token loss (policy_loss, MarsLoss; docs/loss.md).

Every backend computes `mars.reference.policy_loss`. The kernels ("cpu", "cuda", "triton")
are one op, `mars::policy_loss` (`mars::policy_loss_triton`), whose forward reads the
inputs once and returns, besides the loss and the metrics, d(sum of row losses)/d(logp)
per token and a per-row scale (the aggregation weight): backward is one multiply. The
kernels give first-order gradients only (a backward through their backward raises);
backend="reference" is plain autograd, to any order.
"""
from __future__ import annotations

from torch import nn

from .backends import NAMES
from .fused_linear import FusedLinearMarsLoss, fused_linear_policy_loss, token_logprobs
from .policy_loss import policy_loss, policy_loss_parts
from .reference import (CLIP_HIGH, CLIP_LOW, KL_CLAMP, KL_TYPES, LOG_RATIO_CLAMP, LOSS_AGGS, LossOutput,
                        check_policy_loss_options)

__all__ = ["policy_loss", "MarsLoss", "LossOutput", "LOSS_AGGS", "KL_TYPES", "policy_loss_parts",
           "fused_linear_policy_loss", "FusedLinearMarsLoss", "token_logprobs"]


class MarsLoss(nn.Module):
    """`policy_loss` as a module: options fixed (and validated) at construction (see
    policy_loss and docs/loss.md).

    >>> crit = mars.loss.MarsLoss(clip_high=0.28, agg="token-mean")
    >>> out = crit(logp, old_logp, advantages, mask); out.loss.backward()
    """

    def __init__(self, *, clip_low=CLIP_LOW, clip_high=CLIP_HIGH, dual_clip=None, kl_coef=0.0,
                 kl_type="k3", agg="token-mean", loss_scale=None, ratio_level="token",
                 log_ratio_clamp=LOG_RATIO_CLAMP, kl_clamp=KL_CLAMP, backend="auto"):
        super().__init__()
        self.options = dict(clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
                            kl_coef=kl_coef, kl_type=kl_type, agg=agg, loss_scale=loss_scale,
                            ratio_level=ratio_level, log_ratio_clamp=log_ratio_clamp,
                            kl_clamp=kl_clamp, backend=backend)
        check_policy_loss_options(**{k: v for k, v in self.options.items() if k != "backend"})
        if backend not in ("auto",) + NAMES:
            raise ValueError(f"backend must be one of {('auto',) + NAMES}, got {backend!r}")

    def forward(self, logp, old_logp, advantages, mask, ref_logp=None, num_tokens=None,
                num_seqs=None, is_weights=None) -> LossOutput:
        return policy_loss(logp, old_logp, advantages, mask, ref_logp=ref_logp,
                           num_tokens=num_tokens, num_seqs=num_seqs, is_weights=is_weights,
                           **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())

