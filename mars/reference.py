"""The readable PyTorch specification of every mars op (SPEC sections 2-4).

Each kernel backend cites the function here that it must match. Computation is in
float64; outputs are float32 like the kernels'. Speed is not a goal of this file.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .groups import check_options, prepare


class AdvantageOutput(NamedTuple):
    """advantages [B] f32; per group g (labels in sorted order): mean [G], std [G] f32 of the
    pool (rollouts + anchors; std 0 for a pool of one), count [G] i64 (pool size N),
    gain [G] f32 = mean(rollout rewards) - mean(anchor rewards) (NaN where a group has no
    anchor); group_index [B] i64: each row's group."""
    advantages: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    count: torch.Tensor
    gain: torch.Tensor
    group_index: torch.Tensor


def advantage_dense(rewards, group_index, anchor_rewards, anchor_index, num_groups: int,
                    norm_by_std: bool, eps: float, unbiased: bool, singleton_raw: bool):
    """SPEC section 2 on dense group indices (each group has >= 1 rollout).

    Pool S_g = rollouts + anchors of group g, N = |S_g|:
        mu = mean(S_g);  sigma = sqrt(sum (s - mu)^2 / (N - 1))  (or / N if not unbiased)
        A_i = (r_i - mu) / (sigma + eps)     or  r_i - mu  when not norm_by_std
        N == 1: A_i = r_i if singleton_raw else 0;  sigma + eps == 0 (eps = 0): A_i = 0
    Values are shifted by each group's first rollout before summing, so a group of
    identical values gives exactly 0. Returns (advantages, mean, std, count, gain).
    """
    B, G = rewards.numel(), num_groups
    r, m = rewards.double(), anchor_rewards.double()
    gi, ai = group_index, anchor_index
    zeros = r.new_zeros(G)
    first_row = torch.full((G,), B, dtype=torch.long, device=r.device).scatter_reduce(
        0, gi, torch.arange(B, device=r.device), reduce="amin")
    shift = r[first_row]
    dr, da = r - shift[gi], m - shift[ai]
    n_r = torch.bincount(gi, minlength=G).double()
    n_a = torch.bincount(ai, minlength=G).double()
    n = n_r + n_a
    s_r, s_a = zeros.index_add(0, gi, dr), zeros.index_add(0, ai, da)
    mu = (s_r + s_a) / n                                             # pass 1: mean
    ss = zeros.index_add(0, gi, (dr - mu[gi]) ** 2).index_add(0, ai, (da - mu[ai]) ** 2)
    sigma = torch.where(n > 1, (ss / (n - 1 if unbiased else n)).sqrt(), 0.0)  # pass 2
    centred = dr - mu[gi]
    scale = sigma[gi] + eps  # 0 only when eps = 0 and the pool is constant: then A = 0
    adv = torch.where(scale > 0, centred / scale, 0.0) if norm_by_std else centred
    single = r if singleton_raw else torch.zeros_like(r)
    adv = torch.where(n[gi] == 1, single, adv)
    gain = torch.where(n_a > 0, s_r / n_r - s_a / n_a.clamp(min=1), float("nan"))
    return (adv.float(), (shift + mu).float(), sigma.float(), n.long(), gain.float())


def mono_anchored_advantage(rewards, group_ids, anchor_rewards=None, anchor_group_ids=None, *,
                            norm_by_std=True, eps=1e-6, unbiased=True, singleton="zero",
                            backend="reference", return_stats=False):
    """Reference of `mars.mono_anchored_advantage` (same signature; `backend` is ignored).

    rewards [B] float, group_ids [B] labels (int tensor, or list / numpy array of str or
    int), anchor_rewards [K] float and anchor_group_ids [K] labels of the same kind.
    Returns [B] float32 advantages, or an AdvantageOutput with return_stats=True.
    """
    singleton_raw = check_options(singleton, eps)
    rewards, anchor_rewards, groups = prepare(rewards, group_ids, anchor_rewards, anchor_group_ids)
    out = advantage_dense(rewards, groups.index, anchor_rewards, groups.anchor_index,
                          groups.num_groups, norm_by_std, eps, unbiased, singleton_raw)
    return AdvantageOutput(*out, groups.index) if return_stats else out[0]


# ---------------------------------------------------------------------------------------
# SPEC section 3: clipped-ratio token loss (mars.loss.policy_loss). Validation of the
# arguments lives here once; mars.loss and every backend use it.
# ---------------------------------------------------------------------------------------

LOSS_AGGS = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum",
             "seq-mean-token-sum-norm")
KL_TYPES = ("k1", "k2", "k3")
RATIO_LEVELS = ("token", "sequence")
LOSS_METRICS = ("clip_frac_high", "clip_frac_low", "dual_clip_frac", "approx_kl", "ref_kl",
                "num_tokens")


class LossOutput(NamedTuple):
    """loss: 0-dim tensor (float32; float64 for float64 inputs). metrics: dict of 0-dim
    tensors over the valid tokens of this micro-batch (no host sync): clip_frac_high
    (A > 0 and ratio > 1 + clip_high), clip_frac_low (A < 0 and ratio < 1 - clip_low),
    dual_clip_frac (A < 0 and the dual clip bound active), approx_kl (mean of
    old_logp - logp, clamped like the ratio: verl's ppo_kl), ref_kl (mean KL estimate to
    ref_logp of kl_type, 0 without ref_logp), num_tokens (valid token count)."""
    loss: torch.Tensor
    metrics: dict


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_policy_loss_args(logp, old_logp, advantages, mask, ref_logp, *, clip_low, clip_high,
                           dual_clip, kl_coef, kl_type, agg, num_tokens, num_seqs, loss_scale,
                           ratio_level, log_ratio_clamp):
    """Raises ValueError naming the argument for a bad shape, dtype, device or option."""
    if agg not in LOSS_AGGS:
        raise ValueError(f"agg must be one of {LOSS_AGGS}, got {agg!r}")
    if kl_type not in KL_TYPES:
        raise ValueError(f"kl_type must be one of {KL_TYPES}, got {kl_type!r}")
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"ratio_level must be one of {RATIO_LEVELS}, got {ratio_level!r}")
    if not isinstance(logp, torch.Tensor) or logp.dim() != 2:
        raise ValueError(f"logp must be a [B, T] tensor, got "
                         f"{tuple(logp.shape) if isinstance(logp, torch.Tensor) else type(logp)}")
    shape, device = tuple(logp.shape), logp.device
    if not logp.is_floating_point():
        raise ValueError(f"logp must be a float tensor, got {logp.dtype}")
    named = {"old_logp": old_logp, "mask": mask, "ref_logp": ref_logp, "advantages": advantages}
    for name, t in named.items():
        if t is None and name == "ref_logp":
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but logp is on {device}")
        if name == "advantages":
            if tuple(t.shape) not in (shape[:1], shape):
                raise ValueError(f"advantages must be [B] = {list(shape[:1])} or [B, T] = "
                                 f"{list(shape)}, got {list(t.shape)}")
        elif tuple(t.shape) != shape:
            raise ValueError(f"{name} must have logp's shape {list(shape)}, got {list(t.shape)}")
        if name != "mask" and not t.is_floating_point():
            raise ValueError(f"{name} must be a float tensor, got {t.dtype}")
    if mask.is_complex():
        raise ValueError(f"mask must be bool or 0/1, got {mask.dtype}")
    if not _is_number(kl_coef) or kl_coef < 0:
        raise ValueError(f"kl_coef must be a number >= 0, got {kl_coef!r}")
    if kl_coef > 0 and ref_logp is None:
        raise ValueError(f"kl_coef={kl_coef} > 0 needs ref_logp (the reference policy's log-probs)")
    if not _is_number(clip_low) or not 0 <= clip_low < 1:
        raise ValueError(f"clip_low must be in [0, 1), got {clip_low!r}")
    if not _is_number(clip_high) or clip_high < 0:
        raise ValueError(f"clip_high must be >= 0, got {clip_high!r}")
    if dual_clip is not None and (not _is_number(dual_clip) or dual_clip <= 1):
        raise ValueError(f"dual_clip must be None or > 1 (verl's clip_ratio_c), got {dual_clip!r}")
    if log_ratio_clamp is not None and (not _is_number(log_ratio_clamp) or log_ratio_clamp <= 0):
        raise ValueError(f"log_ratio_clamp must be None (off) or > 0, got {log_ratio_clamp!r}")
    for name, v in (("num_tokens", num_tokens), ("num_seqs", num_seqs), ("loss_scale", loss_scale)):
        if v is None:
            continue
        if isinstance(v, torch.Tensor):
            if v.numel() != 1:
                raise ValueError(f"{name} must be a number or a one-element tensor, got shape "
                                 f"{list(v.shape)}")
            if v.device != device and v.dim() != 0:
                raise ValueError(f"{name} is on {v.device} but logp is on {device}")
        elif not _is_number(v) or not v > 0:
            raise ValueError(f"{name} must be a number > 0 or a tensor, got {v!r}")


def kl_estimate(logp, ref_logp, kl_type: str):
    """KL(pi || pi_ref) per token with d = ref_logp - logp: k1 = -d, k2 = d^2 / 2,
    k3 = exp(d) - d - 1 with d clamped to +-20 and the result to [-10, 10] (verl)."""
    d = ref_logp - logp
    if kl_type == "k1":
        return -d
    if kl_type == "k2":
        return 0.5 * d * d
    d = d.clamp(-20.0, 20.0)
    return (d.exp() - d - 1.0).clamp(-10.0, 10.0)


def per_token_policy_loss(logp, old_logp, advantages, mask, *, ref_logp=None, clip_low=0.2,
                          clip_high=0.2, dual_clip=None, kl_coef=0.0, kl_type="k3",
                          ratio_level="token", log_ratio_clamp=20.0):
    """SPEC section 3 per token. Returns (loss_tok [B, T], valid [B, T] bool, stats) where
    loss_tok is 0 under the mask, and stats holds [B, T] tensors clip_high, clip_low, dual
    (bool), approx_kl (old - logp, clamped), ref_kl (or None). Computed in float32 (float64
    for float64 logp). Only logp carries a gradient.

    Masked positions are *selected* away (where) before any arithmetic, so -inf or NaN
    under the mask never reaches exp and no NaN reaches a gradient.
        log_ratio = clamp(logp - old_logp, -c, c)     (c = log_ratio_clamp; None: no clamp)
        GSPO (ratio_level="sequence"): log_ratio_i = clamp(sum_t m (logp - old) / L_i, -c, c)
        ratio = exp(log_ratio)
        l = max(-A ratio, -A clamp(ratio, 1 - clip_low, 1 + clip_high))
        A < 0 and dual_clip: l = min(l, -A dual_clip)
        l += kl_coef * KL(logp, ref_logp)
    """
    acc = torch.float64 if logp.dtype == torch.float64 else torch.float32
    valid = mask.bool() if mask.dtype != torch.bool else mask
    zero = logp.new_zeros((), dtype=acc)
    x = torch.where(valid, logp.to(acc), zero)
    old = torch.where(valid, old_logp.detach().to(acc), zero)
    adv = advantages.detach().to(acc)
    A = adv[:, None] if adv.dim() == 1 else torch.where(valid, adv, zero)
    tok_lr = x - old
    if log_ratio_clamp is not None:
        tok_lr_c = tok_lr.clamp(-log_ratio_clamp, log_ratio_clamp)
    else:
        tok_lr_c = tok_lr
    if ratio_level == "sequence":
        L = valid.sum(-1, keepdim=True).clamp(min=1).to(acc)
        lr = tok_lr.sum(-1, keepdim=True) / L
        if log_ratio_clamp is not None:
            lr = lr.clamp(-log_ratio_clamp, log_ratio_clamp)
    else:
        lr = tok_lr_c
    ratio = lr.exp()
    l1 = -A * ratio
    l2 = -A * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(l1, l2)
    ratio_b = ratio.expand_as(x)
    stats = {"clip_high": valid & (A > 0) & (ratio_b > 1.0 + clip_high),
             "clip_low": valid & (A < 0) & (ratio_b < 1.0 - clip_low),
             "approx_kl": -tok_lr_c.detach(), "ref_kl": None}
    if dual_clip is not None:
        l3 = -A * dual_clip
        stats["dual"] = valid & (A < 0) & (loss > l3)
        loss = torch.where(A < 0, torch.minimum(loss, l3), loss)
    else:
        stats["dual"] = torch.zeros_like(valid)
    if ref_logp is not None:
        ref = torch.where(valid, ref_logp.detach().to(acc), zero)
        kl = kl_estimate(x, ref, kl_type)
        stats["ref_kl"] = kl.detach()
        if kl_coef:
            loss = loss + kl_coef * kl
    return torch.where(valid, loss, zero), valid, stats


def aggregate_loss(loss_tok, valid, agg: str, num_tokens=None, num_seqs=None, loss_scale=None):
    """SPEC section 3 aggregation of per-token losses (0 under the mask); L_i = valid tokens
    of row i. Global normalisers (numbers or tensors) replace the local counts:
        token-mean:              sum m l / num_tokens            (local: max(sum L_i, 1))
        token-sum:               sum m l
        seq-mean-token-mean:     sum_i [sum_t m l / L_i] / num_seqs   (rows with L_i = 0
                                 add nothing; local num_seqs: max(#{L_i > 0}, 1))
        seq-mean-token-sum:      sum_i [sum_t m l] / num_seqs
        seq-mean-token-sum-norm: seq-mean-token-sum / loss_scale (default max(T, 1); verl: T)"""
    row = loss_tok.sum(-1)
    L = valid.sum(-1).to(row.dtype)
    if agg == "token-mean":
        return row.sum() / (L.sum().clamp(min=1) if num_tokens is None else num_tokens)
    if agg == "token-sum":
        return row.sum()
    nseq = (L > 0).sum().to(row.dtype).clamp(min=1) if num_seqs is None else num_seqs
    if agg == "seq-mean-token-mean":
        return (row / L.clamp(min=1)).sum() / nseq
    out = row.sum() / nseq
    if agg == "seq-mean-token-sum-norm":
        out = out / (max(valid.shape[-1], 1) if loss_scale is None else loss_scale)
    return out


def policy_loss(logp, old_logp, advantages, mask, *, ref_logp=None, clip_low=0.2,
                clip_high=0.2, dual_clip=None, kl_coef=0.0, kl_type="k3", agg="token-mean",
                num_tokens=None, num_seqs=None, loss_scale=None, ratio_level="token",
                log_ratio_clamp=20.0, backend="reference"):
    """Reference of `mars.loss.policy_loss` (same signature; `backend` is ignored): the
    per-token loss of `per_token_policy_loss`, aggregated by `aggregate_loss`, with the
    metrics of LossOutput as masked means over this micro-batch's valid tokens."""
    if old_logp is None:  # on-policy: ratio 1, gradient of the ratio still flows
        old_logp = logp.detach()
    check_policy_loss_args(logp, old_logp, advantages, mask, ref_logp, clip_low=clip_low,
                           clip_high=clip_high, dual_clip=dual_clip, kl_coef=kl_coef,
                           kl_type=kl_type, agg=agg, num_tokens=num_tokens, num_seqs=num_seqs,
                           loss_scale=loss_scale, ratio_level=ratio_level,
                           log_ratio_clamp=log_ratio_clamp)
    loss_tok, valid, st = per_token_policy_loss(
        logp, old_logp, advantages, mask, ref_logp=ref_logp, clip_low=clip_low,
        clip_high=clip_high, dual_clip=dual_clip, kl_coef=kl_coef, kl_type=kl_type,
        ratio_level=ratio_level, log_ratio_clamp=log_ratio_clamp)
    loss = aggregate_loss(loss_tok, valid, agg, num_tokens, num_seqs, loss_scale)
    n = valid.sum().to(loss_tok.dtype)
    d = n.clamp(min=1)
    zero = loss_tok.new_zeros(())
    metrics = {
        "clip_frac_high": st["clip_high"].sum().to(d.dtype) / d,
        "clip_frac_low": st["clip_low"].sum().to(d.dtype) / d,
        "dual_clip_frac": st["dual"].sum().to(d.dtype) / d,
        "approx_kl": torch.where(valid, st["approx_kl"], zero).sum() / d,
        "ref_kl": (zero if st["ref_kl"] is None
                   else torch.where(valid, st["ref_kl"], zero).sum() / d),
        "num_tokens": n,
    }
    return LossOutput(loss, metrics)


# ---------------------------------------------------------------------------------------
# SPEC section 4: fused lm-head + log-softmax + policy loss (mars.loss.fused_linear_policy_loss,
# mars.loss.token_logprobs). Here the [B, T, V] logits are materialised on purpose.
# ---------------------------------------------------------------------------------------

def token_logprobs(hidden, weight, ids, *, bias=None, temperature=1.0, mask=None,
                   chunk_size=None, backend="reference"):
    """Reference of `mars.loss.token_logprobs`: log-prob of each chosen id [B, T] under
    softmax((hidden @ weight^T + bias) / temperature), float32 (float64 for float64 hidden).
    Positions outside `mask` (when given) are 0 and their ids may be anything.
    `chunk_size` and `backend` are ignored. Differentiable (the fused path is not)."""
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    logits = torch.nn.functional.linear(hidden.to(acc), weight.to(acc),
                                        None if bias is None else bias.to(acc))  # [B, T, V]
    logp_all = torch.log_softmax(logits / temperature, dim=-1)
    safe_ids = torch.where(valid, ids, 0).long()
    logp = logp_all.gather(-1, safe_ids[..., None])[..., 0]
    return torch.where(valid, logp, logp.new_zeros(()))


def fused_linear_policy_loss(hidden, weight, ids, old_logp, advantages, mask, *, bias=None,
                             temperature=1.0, chunk_size=None, backend="reference",
                             **policy_loss_options):
    """Reference of `mars.loss.fused_linear_policy_loss`: materialises the logits,
    logp = token_logprobs(hidden, weight, ids, bias, temperature, mask), then
    `policy_loss(logp, old_logp, advantages, mask, **policy_loss_options)`. Gradients reach
    hidden, weight and bias through plain autograd. `chunk_size`, `backend` are ignored."""
    logp = token_logprobs(hidden, weight, ids, bias=bias, temperature=temperature, mask=mask)
    return policy_loss(logp, old_logp, advantages, mask, **policy_loss_options)


fused_linear_policy_loss_reference = fused_linear_policy_loss
