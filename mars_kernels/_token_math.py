"""The token-level math of the clipped-ratio loss, shared by the Triton kernels of
`mars_kernels.policy_loss` (a tile of BLOCK tokens, compute dtype DT = fp32 / fp64) and
`mars_kernels.fused_linear` (one token per program, fp32 scalars), so that both follow
`mars.reference.per_token_policy_loss` in the same order of operations.

Every helper takes `zero`, a 0 of the caller's shape and compute dtype (a [BLOCK] DT tile
or an fp32 scalar), for its constants: the results keep that shape and dtype (no
promotion of a Python float to fp32 in the fp64 kernel).
"""
import math

import triton
import triton.language as tl

from mars_kernels.constants import K3_COEFS, K3_SERIES_BELOW

# The series' highest factorial, 15!: `kl_term` derives 1/n! (n = 15 .. 2, K3_COEFS) from
# it in float64 (n! is exact there), folded to constants at compile time.
if len(K3_COEFS) != 14 or K3_COEFS[0] != 1.0 / math.factorial(15):
    raise RuntimeError("mars_kernels: the k3 series changed in mars.reference; "
                       "update the kernels' coefficients")
K3_TOP_FACTORIAL = float(math.factorial(15))
__all__ = ["K3_SERIES_BELOW", "K3_TOP_FACTORIAL", "clamp_log_ratio", "clipped_ratio_loss",
           "kl_term"]


@triton.jit
def clamp_log_ratio(lr, c, zero, HAS_CLAMP: tl.constexpr):
    """(lr clamped to [-c, c], inside): inside is 1 where lr was within [-c, c] (the
    clamp's gradient), else 0; lr and 1 unchanged without HAS_CLAMP."""
    inside = zero + 1.0
    if HAS_CLAMP:
        inside = tl.where((lr >= -c) & (lr <= c), inside, zero)
        lr = tl.minimum(tl.maximum(lr, -c), c)
    return lr, inside


@triton.jit
def clipped_ratio_loss(A, r, w, lo, hi, dual_c, zero, HAS_DUAL: tl.constexpr,
                       HAS_IS: tl.constexpr):
    """(loss, dl, dm) of ratio r, advantage A (and importance-sampling weight w with
    HAS_IS): loss = max(-A r, -A clip(r, lo, hi)), then the dual clip -A dual_c for A < 0;
    dl = d loss / d log-ratio (before the clamp's `inside`); dm: where the dual clip
    decided (all False without HAS_DUAL). A == 0 or w == 0 gives loss 0 and dl 0 even for
    r = inf (never 0 * inf)."""
    l1 = -A * r
    l2 = -A * tl.minimum(tl.maximum(r, lo), hi)
    clipped = l2 > l1
    loss = tl.where(clipped, l2, l1)
    dl = tl.where(clipped, zero, l1)
    dm = zero < zero
    if HAS_DUAL:
        l3 = -A * dual_c
        dm = (A < 0.0) & (loss > l3)
        loss = tl.where(dm, l3, loss)
        dl = tl.where(dm, zero, dl)
    a0 = A == 0.0
    loss = tl.where(a0, zero, loss)
    dl = tl.where(a0, zero, dl)
    if HAS_IS:  # w == 0 decides like A == 0
        w0 = w == 0.0
        loss = tl.where(w0, zero, loss * w)
        dl = tl.where(w0, zero, dl * w)
    return loss, dl, dm


@triton.jit
def kl_term(ref, x, r, dmax, kmax, zero, DT: tl.constexpr, KL_TYPE: tl.constexpr,
            K3_TOP: tl.constexpr, K3_BELOW: tl.constexpr):
    """(kl, dkl = d kl / d logp) of d = ref - x (mars.reference.kl_estimate), KL_TYPE
    0 k1, 1 k2, 2 k3, 3 k3_ratio (k3 r; the ratio's own share of the gradient is the
    caller's). k3 = e^d - 1 - d with d clamped to [-dmax, dmax] and k3 to [-kmax, kmax]
    (no gradient where either clamp bites; verl: 20 and 10; +inf both: no clamp, TRL's
    k3; dmax, kmax: scalars of the compute dtype): below |d| < K3_BELOW the reference's series
    (coefficients 1/n!, n = 15 .. 2, K3_TOP = 15!: n! is exact in float64, 1 / n! is
    correctly rounded to DT and folded at compile time), exp(d) - 1 - d above."""
    d = ref - x
    if KL_TYPE == 0:
        kl = -d
        dkl = zero + 1.0
    elif KL_TYPE == 1:
        kl = 0.5 * d * d
        dkl = -d
    else:
        d_in = (d >= -dmax) & (d <= dmax)
        dc = tl.minimum(tl.maximum(d, -dmax), dmax)
        fact = tl.full([], K3_TOP, tl.float64)
        q = zero + (1.0 / fact).to(DT)
        for n in tl.static_range(14, 1, -1):
            fact = fact / (n + 1)  # n!
            q = q * dc + (1.0 / fact).to(DT)
        ks = q * dc * dc
        small = (dc < K3_BELOW) & (dc > -K3_BELOW)
        eb = tl.exp(dc) - 1.0
        em1 = tl.where(small, dc + ks, eb)  # e^d - 1
        k3 = tl.where(small, ks, eb - dc)
        k_in = (k3 >= -kmax) & (k3 <= kmax)
        kl = tl.minimum(tl.maximum(k3, -kmax), kmax)
        dkl = tl.where(d_in & k_in, -em1, zero)
    if KL_TYPE == 3:  # k3 r, 0 where k3 (or dk3) is 0 (never 0 * inf)
        k0 = kl == 0.0
        dkl = tl.where(k0 | (dkl == 0.0), zero, dkl * r)
        kl = tl.where(k0, zero, kl * r)
    return kl, dkl
