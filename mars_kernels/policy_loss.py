"""Triton kernels of the clipped-ratio token loss (docs/loss.md).

Matches `mars.reference.policy_loss`. One program per row reads logp, old_logp, (ref_logp),
(is_weights), mask and the advantage once and, in the same pass, writes d(row loss
sum)/d(logp) per token (backward only scales it) and the row's partial sums: loss, valid
tokens, clip-high / clip-low / dual-clip counts, approx-KL and ref-KL sums. GSPO (SEQ)
first reduces the row's mean log-ratio and finally adds the sequence term to the row's
gradient. The rows are then aggregated by a fixed-order reduction (no atomics:
deterministic). Masked tokens are replaced by 0 on load, so -inf / NaN under the mask never
reaches exp or a gradient. A == 0 (or an importance-sampling weight of 0) gives loss 0 and
gradient 0 even for an infinite ratio (clamp off), and k3 is e^d - 1 - d by the reference's
series below |d| < 0.5 (mars.reference.kl_estimate), the same order of operations as the
C++ / CUDA bodies (csrc/policy_loss.h).
"""
import math

import numpy as np
import torch
import triton
import triton.language as tl

from mars.reference import K3_COEFS, K3_SERIES_BELOW

# The series' highest factorial, 15!: the kernel derives 1/n! (n = 15 .. 2, K3_COEFS) from
# it in float64 (n! is exact there), folded to constants at compile time.
if len(K3_COEFS) != 14 or K3_COEFS[0] != 1.0 / math.factorial(15):
    raise RuntimeError("mars_kernels.policy_loss: the k3 series changed in mars.reference; "
                       "update the kernel's coefficients")
K3_TOP_FACTORIAL = float(math.factorial(15))


NCOL = 7  # S, L, high, low, dual, approx_kl, ref_kl
AGGS = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum",
        "seq-mean-token-sum-norm")


@triton.jit
def _f64(bits):
    """A float64 passed as its bit pattern (an int argument: Triton would type a Python
    float argument float32, rounding it)."""
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


# The options are kernel arguments (no per-call tensor of them, so no host-to-device copy);
# do_not_specialize: a bit pattern that happens to equal 1 must not become a constexpr.
@triton.jit(do_not_specialize=["lo_bits", "hi_bits", "dual_bits", "kl_bits", "clamp_bits"])
def _policy_loss_fwd(lp_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, is_ptr, grad_ptr, part_ptr,
                     T, lo_bits, hi_bits, dual_bits, kl_bits, clamp_bits,
                     ADV_2D: tl.constexpr, HAS_IS: tl.constexpr,
                     IS_2D: tl.constexpr, HAS_REF: tl.constexpr, KL_TYPE: tl.constexpr,
                     HAS_KL: tl.constexpr, HAS_DUAL: tl.constexpr, HAS_CLAMP: tl.constexpr,
                     SEQ: tl.constexpr, DT: tl.constexpr, BLOCK: tl.constexpr,
                     K3_TOP: tl.constexpr, K3_BELOW: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    base = i * T
    offs = tl.arange(0, BLOCK)
    # options: float64 values rounded to the compute dtype, as torch rounds a Python scalar
    lo = _f64(lo_bits).to(DT)
    hi = _f64(hi_bits).to(DT)
    dual_c = _f64(dual_bits).to(DT)
    kl_coef = _f64(kl_bits).to(DT)
    c = _f64(clamp_bits).to(DT)
    zero = tl.zeros([BLOCK], dtype=DT)
    if not ADV_2D:
        a_row = tl.load(adv_ptr + i).to(DT)
    if HAS_IS:
        if not IS_2D:
            w_row = tl.load(is_ptr + i).to(DT)
    r_seq = 1.0
    dlw = 1.0
    if SEQ:  # GSPO: log w_i = clamp(sum_t m (logp - old) / L_i)
        s = tl.zeros([BLOCK], dtype=tl.float64)
        cnt = tl.zeros([BLOCK], dtype=tl.int32)
        for start in range(0, T, BLOCK):
            idx = start + offs
            m = tl.load(mask_ptr + base + idx, mask=idx < T, other=0) != 0
            x = tl.load(lp_ptr + base + idx, mask=m, other=0.0).to(DT)
            o = tl.load(old_ptr + base + idx, mask=m, other=0.0).to(DT)
            s += tl.where(m, x - o, zero).to(tl.float64)
            cnt += m.to(tl.int32)
        n_row = tl.maximum(tl.sum(cnt, axis=0), 1).to(tl.float64)
        lw = (tl.sum(s, axis=0) / n_row).to(DT)
        if HAS_CLAMP:
            dlw = tl.where((lw >= -c) & (lw <= c), 1.0, 0.0)
            lw = tl.minimum(tl.maximum(lw, -c), c)
        r_seq = tl.exp(lw)
    S = tl.zeros([BLOCK], dtype=DT)
    akl = tl.zeros([BLOCK], dtype=DT)
    rkl = tl.zeros([BLOCK], dtype=DT)
    G = tl.zeros([BLOCK], dtype=DT)
    L = tl.zeros([BLOCK], dtype=tl.int32)
    nh = tl.zeros([BLOCK], dtype=tl.int32)
    nl = tl.zeros([BLOCK], dtype=tl.int32)
    nd = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, T, BLOCK):
        idx = start + offs
        inb = idx < T
        m = tl.load(mask_ptr + base + idx, mask=inb, other=0) != 0
        x = tl.load(lp_ptr + base + idx, mask=m, other=0.0).to(DT)
        o = tl.load(old_ptr + base + idx, mask=m, other=0.0).to(DT)
        if ADV_2D:
            A = tl.load(adv_ptr + base + idx, mask=m, other=0.0).to(DT)
        else:
            A = zero + a_row
        lr = x - o
        inside = zero + 1.0
        if HAS_CLAMP:
            inside = tl.where((lr >= -c) & (lr <= c), inside, zero)
            lr = tl.minimum(tl.maximum(lr, -c), c)
        if SEQ:
            r = zero + r_seq
        else:
            r = tl.exp(lr)
        l1 = -A * r
        l2 = -A * tl.minimum(tl.maximum(r, lo), hi)
        clipped = l2 > l1
        loss = tl.where(clipped, l2, l1)
        dl = tl.where(clipped, zero, l1)  # d l / d log-ratio
        nh += (m & (A > 0.0) & (r > hi)).to(tl.int32)
        nl += (m & (A < 0.0) & (r < lo)).to(tl.int32)
        if HAS_DUAL:
            l3 = -A * dual_c
            dm = (A < 0.0) & (loss > l3)
            loss = tl.where(dm, l3, loss)
            dl = tl.where(dm, zero, dl)
            nd += (m & dm).to(tl.int32)
        a0 = A == 0.0  # loss 0 and no gradient, even for r = inf (never 0 * inf)
        loss = tl.where(a0, zero, loss)
        dl = tl.where(a0, zero, dl)
        if HAS_IS:  # importance-sampling weight of the policy term; w == 0 like A == 0
            if IS_2D:
                w = tl.load(is_ptr + base + idx, mask=m, other=0.0).to(DT)
            else:
                w = zero + w_row
            w0 = w == 0.0
            loss = tl.where(w0, zero, loss * w)
            dl = tl.where(w0, zero, dl * w)
        if SEQ:
            G += tl.where(m, dl, zero)
            gt = zero
        else:
            gt = dl * inside
        akl += tl.where(m, -lr, zero)
        if HAS_REF:
            ref = tl.load(ref_ptr + base + idx, mask=m, other=0.0).to(DT)
            d = ref - x
            if KL_TYPE == 0:
                kl = -d
                dkl = zero + 1.0
            elif KL_TYPE == 1:
                kl = 0.5 * d * d
                dkl = -d
            else:
                d_in = (d >= -20.0) & (d <= 20.0)
                dc = tl.minimum(tl.maximum(d, -20.0), 20.0)
                # k3 = e^d - 1 - d: series below |d| < 0.5 (coefficients 1/n!, n = 15 .. 2,
                # K3_COEFS rounded to the compute dtype: n! is exact in float64, 1 / n! is
                # correctly rounded and folded at compile time), exp(d) - 1 - d above;
                # em1 = e^d - 1
                fact = tl.full([], K3_TOP, tl.float64)
                q = zero + (1.0 / fact).to(DT)
                for n in tl.static_range(14, 1, -1):
                    fact = fact / (n + 1)  # n!
                    q = q * dc + (1.0 / fact).to(DT)
                ks = q * dc * dc
                small = (dc < K3_BELOW) & (dc > -K3_BELOW)
                eb = tl.exp(dc) - 1.0
                em1 = tl.where(small, dc + ks, eb)
                k = tl.where(small, ks, eb - dc)
                k_in = (k >= -10.0) & (k <= 10.0)
                kl = tl.minimum(tl.maximum(k, -10.0), 10.0)
                dkl = tl.where(d_in & k_in, -em1, zero)
            if KL_TYPE == 3:  # k3_ratio: k3 r, 0 where k3 (or dk3) is 0 (never 0 * inf)
                k0 = kl == 0.0
                dkl = tl.where(k0 | (dkl == 0.0), zero, dkl * r)
                kl = tl.where(k0, zero, kl * r)
            rkl += tl.where(m, kl, zero)
            if HAS_KL:
                loss = loss + kl_coef * kl
                gt = gt + kl_coef * dkl
                if KL_TYPE == 3:  # the ratio's share: through the row's ratio (GSPO) or lr
                    if SEQ:
                        G += tl.where(m, kl_coef * kl, zero)
                    else:
                        gt = gt + tl.where(inside == 0.0, zero, kl_coef * kl)
        S += tl.where(m, loss, zero)
        L += m.to(tl.int32)
        tl.store(grad_ptr + base + idx, tl.where(m, gt, zero), mask=inb)
    n_tok = tl.sum(L, axis=0)
    if SEQ:  # d l_it / d logp_is = dl_it/dlw * dlw * m_is / L_i
        add = (tl.sum(G, axis=0) / tl.maximum(n_tok, 1).to(DT)) * dlw
        for start in range(0, T, BLOCK):
            idx = start + offs
            inb = idx < T
            m = tl.load(mask_ptr + base + idx, mask=inb, other=0) != 0
            g = tl.load(grad_ptr + base + idx, mask=inb, other=0.0)
            tl.store(grad_ptr + base + idx, tl.where(m, g + add, g), mask=inb)
    pr = part_ptr + i * 7
    tl.store(pr + 0, tl.sum(S, axis=0))
    tl.store(pr + 1, n_tok.to(DT))
    tl.store(pr + 2, tl.sum(nh, axis=0).to(DT))
    tl.store(pr + 3, tl.sum(nl, axis=0).to(DT))
    tl.store(pr + 4, tl.sum(nd, axis=0).to(DT))
    tl.store(pr + 5, tl.sum(akl, axis=0))
    tl.store(pr + 6, tl.sum(rkl, axis=0))


def _finalize(part, T: int, agg: int, num_tokens: float, num_seqs: float, loss_scale: float):
    """Fixed-order aggregation of the row partials [B, 7] (float64 math, like the C++ op):
    loss = sum_i w_i S_i / denom, row_scale_i = w_i / denom, metrics [6]."""
    p = part.double()
    S, L = p[:, 0], p[:, 1]
    N = L.sum()
    n1 = N.clamp(min=1)
    name = AGGS[agg]
    # given normalisers stay Python floats: a new device tensor would be a blocking copy
    if name == "token-mean":
        denom = n1 if num_tokens <= 0 else num_tokens
    elif name == "token-sum":
        denom = 1.0
    else:
        denom = (L > 0).sum().double().clamp(min=1) if num_seqs <= 0 else num_seqs
        if name == "seq-mean-token-sum-norm":
            denom = denom * (loss_scale if loss_scale > 0 else float(T))
    w = 1.0 / L.clamp(min=1) if name == "seq-mean-token-mean" else torch.ones_like(L)
    loss = (S * w).sum() / denom
    metrics = torch.cat([p[:, 2:].sum(0) / n1, N[None]])
    dt = part.dtype
    return loss.to(dt), metrics.to(dt), (w / denom).to(dt)


def policy_loss(logp, old_logp, advantages, mask, ref_logp, is_weights, clip_low: float,
                clip_high: float, dual_clip: float, kl_coef: float, kl_type: int, agg: int,
                num_tokens: float, num_seqs: float, loss_scale: float, seq_ratio: bool,
                log_ratio_clamp: float):
    """Launcher, same contract as the C++ op mars::policy_loss (csrc/ops.cpp): returns
    (loss 0-dim, metrics [6], grad [B, T] unscaled, row_scale [B]), fp32 (fp64 for fp64).
    Options go to the kernel as arguments and to the aggregation as Python numbers: no
    host-to-device copy and no host sync per call (two kernel launches plus the few torch
    ops of `_finalize`)."""
    B, T = logp.shape
    acc = torch.float64 if logp.dtype == torch.float64 else torch.float32
    x, o, a = logp.contiguous(), old_logp.contiguous(), advantages.contiguous()
    m = mask.contiguous().view(torch.uint8)
    has_ref = ref_logp is not None
    r = ref_logp.contiguous() if has_ref else x
    has_is = is_weights is not None
    w = is_weights.contiguous() if has_is else x  # not read without weights
    for name, v in (("clip_low", clip_low), ("clip_high", clip_high), ("dual_clip", dual_clip),
                    ("kl_coef", kl_coef), ("log_ratio_clamp", log_ratio_clamp),
                    ("num_tokens", num_tokens), ("num_seqs", num_seqs), ("loss_scale", loss_scale)):
        if v != v:  # the op's own contract (mars.reference.check_policy_loss_args checks all)
            raise ValueError(f"{name} must not be NaN")
    if not 0 <= kl_type <= 3:
        raise ValueError(f"kl_type must be 0, 1, 2 or 3, got {kl_type}")
    # float64 bit patterns of the options, passed by value: no tensor, no copy to the device
    bits = np.array([1.0 - clip_low, 1.0 + clip_high, dual_clip, kl_coef, log_ratio_clamp],
                    dtype=np.float64).view(np.int64).tolist()
    grad = torch.empty((B, T), dtype=acc, device=x.device)
    part = torch.empty((B, NCOL), dtype=acc, device=x.device)
    if B > 0:
        block = min(1024, max(16, triton.next_power_of_2(max(T, 1))))
        _policy_loss_fwd[(B,)](
            x, o, a, m, r, w, grad, part, T, *bits, ADV_2D=a.dim() == 2, HAS_IS=has_is,
            IS_2D=has_is and w.dim() == 2, HAS_REF=has_ref,
            KL_TYPE=int(kl_type), HAS_KL=bool(kl_coef > 0 and has_ref),
            HAS_DUAL=bool(dual_clip > 0), HAS_CLAMP=bool(log_ratio_clamp > 0),
            SEQ=bool(seq_ratio), DT=tl.float64 if acc == torch.float64 else tl.float32,
            BLOCK=block, K3_TOP=K3_TOP_FACTORIAL, K3_BELOW=K3_SERIES_BELOW)
    loss, metrics, row_scale = _finalize(part, T, agg, num_tokens, num_seqs, loss_scale)
    return loss, metrics, grad, row_scale
