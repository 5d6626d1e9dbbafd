"""verl policy loss ``mars``: ``mars.loss.policy_loss`` in verl's policy-loss signature.

verl 0.9.1 calls a registered policy loss from ``ppo_loss`` (verl/workers/utils/losses.py
L103-112) with keywords only::

    fn(old_log_prob=, log_prob=, advantages=, response_mask=, loss_agg_mode=,
       config=<ActorConfig>, rollout_is_weights=)

after setting ``config.global_batch_info`` (L64-68: dp_size, batch_num_tokens,
global_batch_size, loss_scale_factor). It adds the entropy and KL terms itself, so this
loss is the clipped policy term only, as ``compute_policy_loss_vanilla``
(verl/trainer/ppo/core_algos.py L1286-1376) is.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from mars_kernels.constants import LOG_RATIO_CLAMP

__all__ = ["compute_policy_loss_mars", "verl_loss_options"]


def _get(config, key, default=None):
    if hasattr(config, "get"):
        try:
            return config.get(key, default)
        except Exception:
            pass
    return getattr(config, key, default)


def verl_loss_options(config, loss_agg_mode: str) -> tuple[dict, int]:
    """mars.loss.policy_loss options from verl's actor config, and the dp_size factor.

    - clip_low / clip_high: ``clip_ratio_low`` / ``clip_ratio_high``, each falling back to
      ``clip_ratio`` when None (as compute_policy_loss_vanilla does).
    - dual_clip: ``clip_ratio_c`` (verl's default 3.0; verl always applies it, so does this).
    - agg: ``loss_agg_mode`` (verl's five names are mars's).
    - normalisers from ``config.global_batch_info``: ``batch_num_tokens`` -> num_tokens,
      ``global_batch_size`` -> num_seqs, ``loss_scale_factor`` -> loss_scale; the loss is
      then multiplied by ``dp_size`` like verl's ``agg_loss`` (core_algos.py L1140-1206),
      so data-parallel ranks average to the global batch's gradient.

    Raises ValueError when config is None, or dp_size > 1 without the global count the mode
    needs (verl's agg_loss raises there too)."""
    if config is None:
        raise ValueError("the 'mars' policy loss needs verl's actor config (config=None given)")
    clip = _get(config, "clip_ratio", 0.2)
    low = _get(config, "clip_ratio_low", None)
    high = _get(config, "clip_ratio_high", None)
    info = _get(config, "global_batch_info", None) or {}
    dp_size = int(info.get("dp_size", 1) or 1)
    num_tokens = info.get("batch_num_tokens", None)
    num_seqs = info.get("global_batch_size", None)
    loss_scale = info.get("loss_scale_factor", None)
    if loss_scale is None:
        loss_scale = _get(config, "loss_scale_factor", None)
    if dp_size > 1:
        if loss_agg_mode == "token-mean" and num_tokens is None:
            raise ValueError("loss_agg_mode token-mean with dp_size > 1 needs "
                             "global_batch_info['batch_num_tokens']")
        if loss_agg_mode.startswith("seq-mean") and num_seqs is None:
            raise ValueError(f"loss_agg_mode {loss_agg_mode} with dp_size > 1 needs "
                             "global_batch_info['global_batch_size']")
    opts = dict(
        clip_low=clip if low is None else low,
        clip_high=clip if high is None else high,
        dual_clip=_get(config, "clip_ratio_c", 3.0),
        agg=loss_agg_mode,
        num_tokens=num_tokens if loss_agg_mode == "token-mean" else None,
        num_seqs=num_seqs if loss_agg_mode.startswith("seq-mean") else None,
        loss_scale=loss_scale if loss_agg_mode == "seq-mean-token-sum-norm" else None,
        log_ratio_clamp=LOG_RATIO_CLAMP,  # verl clamps the log-ratio at +-20 as well
    )
    return opts, dp_size


def compute_policy_loss_mars(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Optional[Any] = None,
    rollout_is_weights: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped-ratio policy loss through mars's kernels, verl's signature and metrics.

    Args:
        old_log_prob, log_prob: [bs, L] log-probs (log_prob requires grad).
        advantages: [bs, L] (verl's token-level advantages) or [bs].
        response_mask: [bs, L] bool / 0-1.
        loss_agg_mode: token-mean | token-sum | seq-mean-token-mean | seq-mean-token-sum |
            seq-mean-token-sum-norm.
        config: verl's ActorConfig (or its DictConfig): clip ratios, clip_ratio_c,
            global_batch_info (see :func:`verl_loss_options`).
        rollout_is_weights: None or [bs, L] / [bs] importance-sampling weights, finite and
            >= 0 at unmasked tokens; they multiply the policy term.

    Returns:
        (loss 0-dim fp32 tensor, metrics) with verl's metric names, as Python floats:
        ``actor/pg_clipfrac`` (fraction of valid tokens where the clipped term decides:
        A > 0 and ratio > 1 + clip_high, or A < 0 and ratio < 1 - clip_low),
        ``actor/pg_clipfrac_lower`` (A < 0 and the dual clip decides), ``actor/ppo_kl``
        (mean of old_log_prob - log_prob, clamped to [-20, 20]).

    Raises:
        ValueError naming the argument or option (mars.loss's checks and
        :func:`verl_loss_options`).
    """
    from mars.loss import policy_loss

    opts, dp_size = verl_loss_options(config, loss_agg_mode)
    out = policy_loss(log_prob, old_log_prob, advantages, response_mask,
                      is_weights=rollout_is_weights, **opts)
    loss = out.loss * dp_size if dp_size != 1 else out.loss
    m = out.metrics
    vals = torch.stack([m["clip_frac_high"] + m["clip_frac_low"], m["dual_clip_frac"],
                        m["approx_kl"]]).detach().cpu().tolist()  # one host read
    metrics = {
        "actor/pg_clipfrac": float(vals[0]),
        "actor/pg_clipfrac_lower": float(vals[1]),
        "actor/ppo_kl": float(vals[2]),
    }
    return loss, metrics
