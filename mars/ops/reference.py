"""The readable PyTorch specification of every mars op: the advantage, the policy loss and
the fused lm-head loss (the losses are documented in docs/loss.md).

Each kernel backend cites the function here that it must match. The advantage is computed
in float64, the losses in float32 (float64 for float64 inputs); outputs are float32 like
the kernels'. Speed is not a goal of this file.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
from mars_kernels.constants import (CLIP_HIGH, CLIP_LOW, K3_COEFS, K3_D_CLAMP, K3_SERIES_BELOW,  # noqa: F401
                                    KL_CLAMP, LOG_RATIO_CLAMP, LOSS_AGGS)  # (re-exported: the specification's numbers)

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
    """docs/advantage.md on dense group indices (each group has >= 1 rollout).

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
# The clipped-ratio token loss (mars.loss.policy_loss; docs/loss.md). Validation of the
# arguments lives here once: mars.loss, the fused loss and every backend use it.
# ---------------------------------------------------------------------------------------

KL_TYPES = ("k1", "k2", "k3", "k3_ratio")  # k3_ratio: k3 times the ratio (TRL, DeepSeek-V3.2)
RATIO_LEVELS = ("token", "sequence")
LOSS_METRICS = ("clip_frac_high", "clip_frac_low", "dual_clip_frac", "approx_kl", "ref_kl",
                "num_tokens")
NORMALISERS = ("num_tokens", "num_seqs", "loss_scale")
F32_MAX = torch.finfo(torch.float32).max
_KL_COEF_RANGE = f"a finite number in [0, {F32_MAX:.7g}] (float32's largest)"
# k3 = e^d - 1 - d (docs/loss.md, "KL estimators"): for |d| < K3_SERIES_BELOW its Taylor
# series sum_{n=2..15} d^n / n! by Horner's rule (K3_COEFS: 1/n!, highest n first, defined
# once in mars_kernels.constants for the reference and the kernels), else expm1(d) - d.
# exp(d) - d - 1 would lose every digit near d = 0 (fp32: d = 1e-4 gives ~1000% error);
# expm1(d) - d still loses ~eps/|d|. Every kernel evaluates the same polynomial in the same
# order. Truncation error < 1e-17 relative at |d| = 0.5.
# k3's clamp (verl's low_var_kl): the estimate to [-KL_CLAMP, KL_CLAMP], with d to
# +-K3_D_CLAMP; the `kl_clamp` option of policy_loss (None: neither clamp, TRL's k3).
# KL_CLAMP, K3_D_CLAMP and the option defaults CLIP_LOW, CLIP_HIGH, LOG_RATIO_CLAMP are
# defined once in mars_kernels.constants (the kernels use them too).


class LossOutput(NamedTuple):
    """loss: 0-dim tensor (float32; float64 for float64 inputs). metrics: dict of 0-dim
    tensors over the valid tokens of this micro-batch (no host sync): clip_frac_high
    (A > 0 and ratio > 1 + clip_high), clip_frac_low (A < 0 and ratio < 1 - clip_low),
    dual_clip_frac (A < 0 and the dual clip bound active), approx_kl (mean of
    old_logp - logp, clamped like the ratio: verl's ppo_kl), ref_kl (mean KL estimate to
    ref_logp of kl_type, 0 without ref_logp), num_tokens (valid token count)."""
    loss: torch.Tensor
    metrics: dict


def _option(name: str, v, expect: str, ok) -> float:
    """_real(v), then ValueError naming `name` and `expect` unless ok(value)."""
    x = _real(name, v, expect)
    if not ok(x):
        raise ValueError(f"{name} must be {expect}, got {v!r}")
    return x


def _real(name: str, v, expect: str) -> float:
    """v as a Python float: a real number (not bool; numpy scalars too), or a one-element
    real CPU tensor that does not require grad. Raises ValueError naming `name`."""
    if isinstance(v, torch.Tensor):
        if v.numel() != 1 or v.dtype == torch.bool or v.is_complex():
            raise ValueError(f"{name} must be {expect}, got a tensor of shape {list(v.shape)} "
                             f"and dtype {v.dtype}")
        if v.device.type != "cpu":
            raise ValueError(f"{name} must be {expect}, as a Python number or a CPU tensor "
                             f"(reading a {v.device} tensor would wait for the device)")
        if v.requires_grad:
            raise ValueError(f"{name} must not require grad (it is a constant of the loss)")
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise ValueError(f"{name} must be {expect}, got {v!r}")
    try:
        return float(v)
    except (OverflowError, ValueError, TypeError):
        raise ValueError(f"{name} must be {expect}, got {v!r}") from None


def check_policy_loss_options(*, clip_low, clip_high, dual_clip, kl_coef, kl_type, agg,
                              ratio_level, log_ratio_clamp, num_tokens=None, num_seqs=None,
                              loss_scale=None, kl_clamp=KL_CLAMP) -> dict:
    """The options of policy_loss validated against the ranges of docs/loss.md ("Options"),
    as Python floats (or None / the strings). Raises ValueError naming the option and its
    valid range (NaN, inf, a negative value, a bool, a tensor of more than one element...).
    Tensor normalisers are checked here for kind only (one element, real, no grad); their
    values by check_policy_loss_args, which knows the mask."""
    if agg not in LOSS_AGGS:
        raise ValueError(f"agg must be one of {LOSS_AGGS}, got {agg!r}")
    if kl_type not in KL_TYPES:
        raise ValueError(f"kl_type must be one of {KL_TYPES}, got {kl_type!r}")
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"ratio_level must be one of {RATIO_LEVELS}, got {ratio_level!r}")
    cl = _option("clip_low", clip_low, "a number in [0, 1)", lambda x: 0.0 <= x < 1.0)
    ch = _option("clip_high", clip_high, "a number >= 0 (inf: no upper clip)", lambda x: x >= 0.0)
    dc = None if dual_clip is None else _option(
        "dual_clip", dual_clip, "None (off) or a finite number > 1 (verl's clip_ratio_c, e.g. 3)",
        lambda x: 1.0 < x < math.inf)
    kc = _option("kl_coef", kl_coef, _KL_COEF_RANGE, lambda x: 0.0 <= x <= F32_MAX)
    lc = None if log_ratio_clamp is None else _option(
        "log_ratio_clamp", log_ratio_clamp, "None (no clamp) or a finite number > 0 (verl: 20)",
        lambda x: 0.0 < x < math.inf)
    kcl = None if kl_clamp is None else _option(
        "kl_clamp", kl_clamp, "None or inf (no clamp: TRL's k3) or a number > 0 (verl: 10)",
        lambda x: x > 0.0)
    kcl = None if kcl is None or kcl == math.inf else kcl
    out = dict(clip_low=cl, clip_high=ch, dual_clip=dc, kl_coef=kc, kl_type=kl_type, agg=agg,
               ratio_level=ratio_level, log_ratio_clamp=lc, kl_clamp=kcl)
    for name, v in (("num_tokens", num_tokens), ("num_seqs", num_seqs),
                    ("loss_scale", loss_scale)):
        out[name] = v if v is None else _normaliser_kind(name, v)
    return out


_NORM_RANGE = "a finite number > 0 (0 only when this micro-batch has no valid token)"


def _normaliser_kind(name, v):
    """A tensor normaliser reshaped to 0-dim (value checked later), or a number as float."""
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape "
                             f"{list(v.shape)}")
        if v.dtype == torch.bool or v.is_complex():
            raise ValueError(f"{name} must be a real (float or integer) tensor, got {v.dtype}")
        if v.requires_grad:
            raise ValueError(f"{name} must not require grad (a normaliser is a constant; pass "
                             f"{name}.detach())")
        return v.reshape(())
    x = _real(name, v, _NORM_RANGE)
    if not 0.0 <= x < math.inf:
        raise ValueError(f"{name} must be {_NORM_RANGE}, got {v!r}")
    return x


def _traced() -> bool:
    return torch.compiler.is_compiling()


_IS_RANGE = "finite and >= 0 at unmasked positions"


def _is_weights_bad(is_weights, valid):
    """0-dim bool tensor: some weight that the loss uses (at a valid position; for [B]
    weights, of a row with a valid token) is negative, NaN or inf."""
    w = is_weights[:, None] if is_weights.dim() == 1 else is_weights
    return (valid & ~(torch.isfinite(w) & (w >= 0))).any()


def _is_weights_error(is_weights, valid) -> ValueError:
    w = is_weights[:, None] if is_weights.dim() == 1 else is_weights
    bad = (valid & ~(torch.isfinite(w) & (w >= 0))).nonzero()[:5].tolist()
    vals = [w[i, 0 if is_weights.dim() == 1 else t].item() for i, t in bad]
    where = [f"[{i}]" if is_weights.dim() == 1 else f"[{i}, {t}]" for i, t in bad]
    return ValueError(f"is_weights must be {_IS_RANGE} (importance-sampling weights), got "
                      + ", ".join(f"{v!r} at {x}" for v, x in zip(vals, where)))


def _check_normalisers(opts: dict, mask, device, acc, is_weights=None) -> None:
    """Checks the values of the given normalisers in place of `opts`: each finite and > 0,
    or 0 when the mask has no valid token (then replaced by 1: the loss is 0 either way),
    and the importance-sampling weights: finite and >= 0 where the loss uses them.
    Numbers cost nothing. Tensors: CPU ones are read directly; those on the device are
    read together, one host sync for all of them, weights included (docs/loss.md, "Global
    normalisers"). Under torch.compile or CUDA graph capture, where no value can be read,
    torch._assert_async checks them on the device instead (a failing check stops the
    program: a RuntimeError on CPU, a device-side assert on CUDA). Tensors are cast to
    `acc`, the loss's dtype."""
    given = {k: opts[k] for k in NORMALISERS if opts[k] is not None}
    if not given and is_weights is None:
        return
    traced = _traced() or (device.type == "cuda" and torch.cuda.is_available()
                           and torch.cuda.is_current_stream_capturing())
    is_bad = None
    if is_weights is not None:
        is_bad = _is_weights_bad(is_weights, mask)
        if traced:
            torch._assert_async(~is_bad, f"is_weights must be {_IS_RANGE}")
        elif is_weights.device.type == "cpu":
            if bool(is_bad):
                raise _is_weights_error(is_weights, mask)
            is_bad = None
    if not given and is_bad is None:
        return
    tensors = {k: v for k, v in given.items() if isinstance(v, torch.Tensor)}
    for k, v in tensors.items():
        if v.device != device and v.device.type != "cpu":
            raise ValueError(f"{k} is on {v.device} but logp is on {device} (a CPU scalar "
                             "tensor is fine too)")
    no_token = None

    def empty() -> bool:  # reads the mask only when a normaliser is 0 (rare)
        nonlocal no_token
        if no_token is None:
            no_token = not bool(mask.any())
        return no_token

    capturing = any(v.is_cuda for v in tensors.values()) and torch.cuda.is_available() \
        and torch.cuda.is_current_stream_capturing()
    if traced or capturing:
        for k, v in given.items():
            msg = f"{k} must be {_NORM_RANGE}"
            if isinstance(v, torch.Tensor):
                v = v.to(device)
                ok = torch.isfinite(v) & ((v > 0) | ((v == 0) & ~mask.any()))
                torch._assert_async(ok, msg)
                opts[k] = torch.where(v == 0, torch.ones_like(v), v).to(acc)
            elif v == 0:
                torch._assert_async(~mask.any(), msg)
                opts[k] = 1.0
        return
    values = {k: v for k, v in given.items() if not isinstance(v, torch.Tensor)}
    on_dev = [k for k, v in tensors.items() if v.device.type != "cpu"]
    if on_dev or is_bad is not None:  # one host sync for all of them, weights' flag included
        read = torch.stack([tensors[k].to(device=device, dtype=torch.float64) for k in on_dev]
                           + ([] if is_bad is None else [is_bad.to(torch.float64)])).tolist()
        if is_bad is not None and read.pop():
            raise _is_weights_error(is_weights, mask)
        values.update(zip(on_dev, read))
    values.update({k: float(v.item()) for k, v in tensors.items() if v.device.type == "cpu"})
    for k in NORMALISERS:
        if k not in values:
            continue
        x = values[k]
        if not 0.0 <= x < math.inf:
            raise ValueError(f"{k} must be {_NORM_RANGE}, got {x!r}"
                             f"{' (tensor value)' if k in tensors else ''}")
        if x == 0.0:
            if not empty():
                raise ValueError(f"{k} is 0 but this micro-batch has valid tokens: {k} must "
                                 f"be {_NORM_RANGE}")
            opts[k] = 1.0
        elif k in tensors:
            opts[k] = tensors[k].to(acc)


def check_policy_loss_args(logp, old_logp, advantages, mask, ref_logp, *, clip_low, clip_high,
                           dual_clip, kl_coef, kl_type, agg, num_tokens, num_seqs, loss_scale,
                           ratio_level, log_ratio_clamp, is_weights=None,
                           kl_clamp=KL_CLAMP) -> dict:
    """Raises ValueError naming the argument for a bad shape, dtype, device, value or option
    (the ranges of docs/loss.md). Returns the options validated: floats / None, and each
    given normaliser as a number > 0 or a 0-dim tensor of the loss's dtype (a 0 allowed by
    the rules replaced by 1). Every backend computes from these. `is_weights` ([B] or
    [B, T] float) must be finite and >= 0 where the loss uses them (checked with the
    normalisers: one host sync for GPU tensors, none for CPU ones)."""
    opts = check_policy_loss_options(
        clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, kl_coef=kl_coef,
        kl_type=kl_type, agg=agg, ratio_level=ratio_level, log_ratio_clamp=log_ratio_clamp,
        num_tokens=num_tokens, num_seqs=num_seqs, loss_scale=loss_scale, kl_clamp=kl_clamp)
    if not isinstance(logp, torch.Tensor) or logp.dim() != 2:
        raise ValueError(f"logp must be a [B, T] tensor, got "
                         f"{tuple(logp.shape) if isinstance(logp, torch.Tensor) else type(logp)}")
    shape, device = tuple(logp.shape), logp.device
    if not logp.is_floating_point():
        raise ValueError(f"logp must be a float tensor, got {logp.dtype}")
    named = {"old_logp": old_logp, "mask": mask, "ref_logp": ref_logp, "advantages": advantages,
             "is_weights": is_weights}
    for name, t in named.items():
        if t is None and name in ("ref_logp", "is_weights"):
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but logp is on {device}")
        if name in ("advantages", "is_weights"):
            if tuple(t.shape) not in (shape[:1], shape):
                hint = (f" (per-rollout weights of shape [B, 1]: pass {name}[:, 0])"
                        if name == "is_weights" and tuple(t.shape) == (shape[0], 1) else "")
                raise ValueError(f"{name} must be [B] = {list(shape[:1])} or [B, T] = "
                                 f"{list(shape)}, got {list(t.shape)}{hint}")
        elif tuple(t.shape) != shape:
            raise ValueError(f"{name} must have logp's shape {list(shape)}, got {list(t.shape)}")
        if name != "mask" and not t.is_floating_point():
            raise ValueError(f"{name} must be a float tensor, got {t.dtype}")
    if mask.is_complex():
        raise ValueError(f"mask must be bool or 0/1, got {mask.dtype}")
    if opts["kl_coef"] > 0 and ref_logp is None:
        raise ValueError(f"kl_coef={kl_coef} > 0 needs ref_logp (the reference policy's log-probs)")
    acc = torch.float64 if logp.dtype == torch.float64 else torch.float32
    _check_normalisers(opts, mask if mask.dtype == torch.bool else mask != 0, device, acc,
                       None if is_weights is None else is_weights.detach())
    return opts


def k3_series(d):
    """e^d - 1 - d for |d| < K3_SERIES_BELOW: sum_{n=2..15} d^n / n! (Horner, the kernels'
    order of operations), in d's dtype."""
    p = torch.full_like(d, K3_COEFS[0])
    for c in K3_COEFS[1:]:
        p = p * d + c
    return p * d * d


def kl_estimate(logp, ref_logp, kl_type: str, log_ratio=None, kl_clamp=KL_CLAMP):
    """KL(pi || pi_ref) per token with d = ref_logp - logp (docs/loss.md, "KL estimators"):
    k1 = -d, k2 = d^2 / 2, k3 = e^d - 1 - d with d clamped to +-20 and the result to
    [-kl_clamp, kl_clamp] (verl's clamps, kl_clamp 10; None: neither clamp, TRL's k3 =
    exp(d) - d - 1, inf past fp range), computed without cancellation near d = 0: the series
    `k3_series` for |d| < 0.5, expm1(d) - d above. d/d(logp) k3 = -expm1(d) (autograd of
    either branch; the unused branch is finite, so no NaN leaks through torch.where).
    k3_ratio = k3 * exp(log_ratio), the policy ratio of the loss (token or sequence level,
    clamped like it; TRL's use_bias_correction_kl), differentiated through both factors
    (the ratio is not detached, as in TRL); where k3 == 0 it is 0 with gradient 0, also
    for an infinite ratio (never 0 * inf)."""
    if kl_type == "k3_ratio":
        k3 = kl_estimate(logp, ref_logp, "k3", kl_clamp=kl_clamp)
        zero = k3 == 0
        ratio = torch.where(zero, torch.zeros_like(log_ratio), log_ratio).exp()
        return torch.where(zero, torch.zeros_like(k3), k3 * ratio)
    d = ref_logp - logp
    if kl_type == "k1":
        return -d
    if kl_type == "k2":
        return 0.5 * d * d
    if kl_clamp is not None:
        d = d.clamp(-K3_D_CLAMP, K3_D_CLAMP)
    small = d.abs() < K3_SERIES_BELOW
    # the series only where it is used: an inf / huge d never reaches its powers
    k3 = torch.where(small, k3_series(torch.where(small, d, torch.zeros_like(d))),
                     torch.expm1(d) - d)
    return k3 if kl_clamp is None else k3.clamp(-kl_clamp, kl_clamp)


def per_token_policy_loss(logp, old_logp, advantages, mask, *, ref_logp=None, clip_low=CLIP_LOW,
                          clip_high=CLIP_HIGH, dual_clip=None, kl_coef=0.0, kl_type="k3",
                          ratio_level="token", log_ratio_clamp=LOG_RATIO_CLAMP, is_weights=None,
                          kl_clamp=KL_CLAMP):
    """The per-token loss of docs/loss.md. Returns (loss_tok [B, T], valid [B, T] bool, stats)
    where loss_tok is 0 under the mask, and stats holds [B, T] tensors clip_high, clip_low,
    dual (bool), approx_kl (old - logp, clamped), ref_kl (or None). Computed in float32
    (float64 for float64 logp). Only logp carries a gradient. Options already validated.

    Masked positions are *selected* away (where) before any arithmetic, so -inf or NaN
    under the mask never reaches exp and no NaN reaches a gradient.
        log_ratio = clamp(logp - old, -c, c)     (c = log_ratio_clamp; None: no clamp)
        GSPO (ratio_level="sequence"): log_ratio_i = clamp(sum_t m (logp - old) / L_i, -c, c)
        ratio = exp(log_ratio)
        l = max(-A ratio, -A clamp(ratio, 1 - clip_low, 1 + clip_high))
        A < 0 and dual_clip: l = min(l, -A dual_clip)
        A == 0: l = 0 (also when ratio overflows to inf: never 0 * inf)
        l = w * l           importance-sampling weight w ([B] or [B, T]; w == 0: l = 0)
        l += kl_coef * KL(logp, ref_logp)          (not weighted: verl, TRL, Liger alike)
    Where a bound decides l (or A == 0), l is that constant and its gradient exactly 0: the
    differentiable term -A exp(log_ratio) is only evaluated where it is the loss (exp of 0
    elsewhere), so an infinite ratio (clamp off) never meets a zero gradient as 0 * inf.
    Where it is the loss and the ratio is inf (A < 0, no dual clip) loss and gradient are
    +inf: the true value, not a NaN (docs/loss.md, "Huge ratios"). Ties (ratio inside the
    clip range, or on its edge) take the unclipped term, as the kernels do.
    """
    acc = torch.float64 if logp.dtype == torch.float64 else torch.float32
    valid = mask.bool() if mask.dtype != torch.bool else mask
    zero = logp.new_zeros((), dtype=acc)
    x = torch.where(valid, logp.to(acc), zero)
    old = torch.where(valid, old_logp.detach().to(acc), zero)
    adv = advantages.detach().to(acc)
    A = (adv[:, None] if adv.dim() == 1 else torch.where(valid, adv, zero)).expand_as(x)
    tok_lr = x - old
    tok_lr_c = tok_lr if log_ratio_clamp is None else tok_lr.clamp(-log_ratio_clamp,
                                                                     log_ratio_clamp)
    if ratio_level == "sequence":
        L = valid.sum(-1, keepdim=True).clamp(min=1).to(acc)
        lr = tok_lr.sum(-1, keepdim=True) / L
        if log_ratio_clamp is not None:
            lr = lr.clamp(-log_ratio_clamp, log_ratio_clamp)
        lr = lr.expand_as(x)
    else:
        lr = tok_lr_c
    ratio = lr.detach().exp()  # values: which branch, the constant branches, the metrics
    l1 = -A * ratio
    l2 = -A * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    live = ~(l2 > l1)  # the unclipped term -A ratio is the loss (NaN compares False)
    const = l2
    stats = {"clip_high": valid & (A > 0) & (ratio > 1.0 + clip_high),
             "clip_low": valid & (A < 0) & (ratio < 1.0 - clip_low),
             "approx_kl": -tok_lr_c.detach(), "ref_kl": None}
    if dual_clip is not None:
        l3 = -A * dual_clip
        dual = (A < 0) & (torch.maximum(l1, l2) > l3)
        stats["dual"] = valid & dual
        const = torch.where(dual, l3, const)
        live = live & ~dual
    else:
        stats["dual"] = torch.zeros_like(valid)
    a0 = A == 0
    const = torch.where(a0, zero, const)
    if is_weights is not None:  # w == 0 decides like A == 0: l = 0, gradient 0 (never 0 * inf)
        w = is_weights.detach().to(acc)
        W = torch.where(valid, w[:, None] if w.dim() == 1 else w, zero)  # NaN never multiplies
        w0 = W == 0
        const = torch.where(w0, zero, const * W)
        a0 = a0 | w0
    live = live & ~a0 & valid  # masked: exp(0), so a 0 gradient never meets exp = inf (GSPO)
    pg = -A * torch.where(live, lr, zero).exp()
    if is_weights is not None:
        pg = pg * W
    loss = torch.where(live, pg, const)
    if ref_logp is not None:
        ref = torch.where(valid, ref_logp.detach().to(acc), zero)
        kl = kl_estimate(x, ref, kl_type, lr, kl_clamp)
        stats["ref_kl"] = kl.detach()
        if kl_coef:
            loss = loss + kl_coef * kl
    return torch.where(valid, loss, zero), valid, stats


def aggregate_loss(loss_tok, valid, agg: str, num_tokens=None, num_seqs=None, loss_scale=None):
    """Aggregation of per-token losses (0 under the mask; docs/loss.md, "Aggregations");
    L_i = valid tokens of row i. Global normalisers (numbers or tensors, validated by
    check_policy_loss_args) replace the local counts:
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


def policy_loss(logp, old_logp, advantages, mask, *, ref_logp=None, is_weights=None,
                clip_low=CLIP_LOW, clip_high=CLIP_HIGH, dual_clip=None, kl_coef=0.0, kl_type="k3",
                agg="token-mean", num_tokens=None, num_seqs=None, loss_scale=None,
                ratio_level="token", log_ratio_clamp=LOG_RATIO_CLAMP, kl_clamp=KL_CLAMP,
                backend="reference"):
    """Reference of `mars.loss.policy_loss` (same signature; `backend` is ignored): the
    per-token loss of `per_token_policy_loss`, aggregated by `aggregate_loss`, with the
    metrics of LossOutput as masked means over this micro-batch's valid tokens
    (docs/loss.md). Plain autograd: higher-order gradients work (double backward)."""
    if old_logp is None:  # on-policy: ratio 1, gradient of the ratio still flows
        old_logp = logp.detach()
    opts = check_policy_loss_args(logp, old_logp, advantages, mask, ref_logp, clip_low=clip_low,
                                  clip_high=clip_high, dual_clip=dual_clip, kl_coef=kl_coef,
                                  kl_type=kl_type, agg=agg, num_tokens=num_tokens,
                                  num_seqs=num_seqs, loss_scale=loss_scale,
                                  ratio_level=ratio_level, log_ratio_clamp=log_ratio_clamp,
                                  is_weights=is_weights, kl_clamp=kl_clamp)
    return policy_loss_checked(logp, old_logp, advantages, mask, ref_logp, opts, is_weights)


def policy_loss_checked(logp, old_logp, advantages, mask, ref_logp, opts: dict,
                        is_weights=None) -> LossOutput:
    """`policy_loss` on arguments already validated: `opts` as check_policy_loss_args
    returns them (old_logp not None)."""
    tok = {k: opts[k] for k in ("clip_low", "clip_high", "dual_clip", "kl_coef", "kl_type",
                                "ratio_level", "log_ratio_clamp", "kl_clamp")}
    loss_tok, valid, st = per_token_policy_loss(logp, old_logp, advantages, mask,
                                                ref_logp=ref_logp, is_weights=is_weights, **tok)
    loss = aggregate_loss(loss_tok, valid, opts["agg"], opts["num_tokens"], opts["num_seqs"],
                          opts["loss_scale"])
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
# Fused lm-head + log-softmax + policy loss (mars.loss.fused_linear_policy_loss,
# mars.loss.token_logprobs; docs/loss.md, "Fused path"). Here the [B, T, V] logits are
# materialised on purpose.
# ---------------------------------------------------------------------------------------

def token_logprobs(hidden, weight, ids, *, bias=None, temperature=1.0, mask=None,
                   chunk_size=None, backend="reference"):
    """Reference of `mars.loss.token_logprobs`: log-prob of each chosen id [B, T] under
    softmax((hidden @ weight^T + bias) / temperature), float32 (float64 for float64 hidden).
    Positions outside `mask` (when given) are 0 and their ids and hidden states may be
    anything (NaN, inf): the hidden rows are *selected* away (replaced by 0) before the
    matmul, so nothing of them reaches a gradient of hidden, weight or bias (0 * NaN would).
    `chunk_size` and `backend` are ignored. Differentiable, to any order (the fused path
    is not)."""
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    h = torch.where(valid[..., None], hidden.to(acc), hidden.new_zeros((), dtype=acc))
    logits = torch.nn.functional.linear(h, weight.to(acc),
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
    hidden, weight and bias through plain autograd (any order); masked positions contribute
    nothing to them. `chunk_size`, `backend` are ignored."""
    logp = token_logprobs(hidden, weight, ids, bias=bias, temperature=temperature, mask=mask)
    return policy_loss(logp, old_logp, advantages, mask, **policy_loss_options)


fused_linear_policy_loss_reference = fused_linear_policy_loss
