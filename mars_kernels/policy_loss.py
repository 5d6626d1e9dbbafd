"""Triton kernels of the clipped-ratio token loss (docs/loss.md).

Matches `mars.reference.policy_loss`. Each row's T tokens are cut into tiles of BLOCK
(BLOCK depends on T only); a program (i, j) of the grid (B, splits) handles a run of
consecutive tiles of row i, so a small batch still fills the GPU (B = 8 on 132 SMs: up to
132 programs, not 8; `tiling`). In one pass it reads logp, old_logp, (ref_logp),
(is_weights), mask and the advantage once and writes d(row loss sum)/d(logp) per token and
the partial sums of each tile: loss, valid tokens, clip-high / clip-low / dual-clip counts,
approx-KL and ref-KL (and, for GSPO, the row ratio's gradient share), as float64. With
splits = 1 a program adds its row's tile sums itself; with splits > 1 they go to a
[cols, B, tiles] buffer and the finalize adds them: the same float64 additions in the same
order, so the results do not depend on `splits`, bit for bit. The finalize (one program)
then reduces the rows in a fixed order to the loss, the metrics and the per-row scale (the
aggregation weight): no atomics, deterministic. GSPO (SEQ): every program first reduces its
row's mean log-ratio (the same loop, so the same bits), and a third kernel adds the row
term to the gradient. Backward is one kernel (`policy_loss_backward`): grad * (row_scale[i]
* grad_loss), grad_loss read by pointer (no host sync), written in logp's dtype. Options
and normalisers are kernel arguments (float64 bit patterns): no per-call tensor of them,
no host-to-device copy.

Masked tokens are replaced by 0 on load, so -inf / NaN under the mask never reaches exp or
a gradient. A == 0 (or an importance-sampling weight of 0) gives loss 0 and gradient 0 even
for an infinite ratio (clamp off), and k3 is e^d - 1 - d by the reference's series below
|d| < 0.5 (mars.reference.kl_estimate), the same order of operations as the C++ / CUDA
bodies (csrc/policy_loss.h).
"""
import functools
import math

import numpy as np
import torch
import triton
import triton.language as tl

# the token math (clamp, clip, dual clip, KL) is shared with mars_kernels.fused_linear
from mars_kernels._token_math import (K3_SERIES_BELOW, K3_TOP_FACTORIAL, clamp_log_ratio,
                                      clipped_ratio_loss, kl_term)
from mars_kernels.constants import K3_D_CLAMP, KL_CLAMP, LOSS_AGGS

NCOL = 7  # tile partials: S, L, high, low, dual, approx_kl, ref_kl (+ G for GSPO)
AGGS = LOSS_AGGS  # agg code = index
MAX_BLOCK = 512  # tile of tokens; at least 8 tiles per row for T >= 128
# Programs to aim for when B is small: the SM count on CUDA, this elsewhere (interpreter).
TARGET_PROGRAMS = 132


@triton.jit
def _f64(bits):
    """A float64 passed as its bit pattern (an int argument: Triton would type a Python
    float argument float32, rounding it)."""
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


# do_not_specialize: a bit pattern that happens to equal 1 must not become a constexpr.
@triton.jit(do_not_specialize=["lo_bits", "hi_bits", "dual_bits", "kl_bits", "clamp_bits",
                               "kd_bits", "kk_bits"])
def _policy_loss_fwd(lp_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, is_ptr, grad_ptr, part_ptr,
                     B, T, NT, TPS, lo_bits, hi_bits, dual_bits, kl_bits, clamp_bits, kd_bits,
                     kk_bits,
                     ADV_2D: tl.constexpr, HAS_IS: tl.constexpr,
                     IS_2D: tl.constexpr, HAS_REF: tl.constexpr, KL_TYPE: tl.constexpr,
                     HAS_KL: tl.constexpr, HAS_DUAL: tl.constexpr, HAS_CLAMP: tl.constexpr,
                     SEQ: tl.constexpr, DT: tl.constexpr, BLOCK: tl.constexpr,
                     K3_TOP: tl.constexpr, K3_BELOW: tl.constexpr, ROW_SUM: tl.constexpr):
    """Program (i, j): tiles j*TPS .. min((j+1)*TPS, NT) - 1 of row i. grad [B, T] (DT);
    part [NCOL (+1 for SEQ), B, NP] float64: the sums of each tile (NP = NT), or with
    ROW_SUM (one program per row) their sum over the row's tiles in order (NP = 1): the same
    float64 additions in the same order as the finalize does on the tiles."""
    i = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    base = i * T
    # i * 0 + B: an int64 tensor even when B == 1 arrives as a constexpr (no .to on it)
    if ROW_SUM:
        cs = i * 0 + B  # stride between partial columns
        pr = part_ptr + i
    else:
        cs = (i * 0 + B) * NT
        pr = part_ptr + i * NT
    p0 = (i * 0).to(tl.float64)  # ROW_SUM: the row sums of the tile partials, in order
    p1, p2, p3, p4, p5, p6, p7 = p0, p0, p0, p0, p0, p0, p0
    offs = tl.arange(0, BLOCK)
    # options: float64 values rounded to the compute dtype, as torch rounds a Python scalar
    lo = _f64(lo_bits).to(DT)
    hi = _f64(hi_bits).to(DT)
    dual_c = _f64(dual_bits).to(DT)
    kl_coef = _f64(kl_bits).to(DT)
    c = _f64(clamp_bits).to(DT)
    kd = _f64(kd_bits).to(DT)  # k3's clamps (inf: off)
    kk = _f64(kk_bits).to(DT)
    zero = tl.zeros([BLOCK], dtype=DT)
    if not ADV_2D:
        a_row = tl.load(adv_ptr + i).to(DT)
    if HAS_IS:
        if not IS_2D:
            w_row = tl.load(is_ptr + i).to(DT)
    r_seq = 1.0
    dlw = 1.0
    if SEQ:  # GSPO: log w_i = clamp(sum_t m (logp - old) / L_i), over the whole row
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
    k_end = tl.minimum(j * TPS + TPS, NT)
    for k in range(j * TPS, k_end):
        idx = k * BLOCK + offs
        inb = idx < T
        m = tl.load(mask_ptr + base + idx, mask=inb, other=0) != 0
        x = tl.load(lp_ptr + base + idx, mask=m, other=0.0).to(DT)
        o = tl.load(old_ptr + base + idx, mask=m, other=0.0).to(DT)
        if ADV_2D:
            A = tl.load(adv_ptr + base + idx, mask=m, other=0.0).to(DT)
        else:
            A = zero + a_row
        if HAS_IS:  # importance-sampling weight of the policy term
            if IS_2D:
                w = tl.load(is_ptr + base + idx, mask=m, other=0.0).to(DT)
            else:
                w = zero + w_row
        else:
            w = zero
        lr, inside = clamp_log_ratio(x - o, c, zero, HAS_CLAMP)
        if SEQ:
            r = zero + r_seq
        else:
            r = tl.exp(lr)
        loss, dl, dm = clipped_ratio_loss(A, r, w, lo, hi, dual_c, zero, HAS_DUAL, HAS_IS)
        nh = (m & (A > 0.0) & (r > hi)).to(tl.int32)
        nl = (m & (A < 0.0) & (r < lo)).to(tl.int32)
        nd = (m & dm).to(tl.int32)
        if SEQ:
            G = tl.where(m, dl, zero)
            gt = zero
        else:
            gt = dl * inside
        rkl = zero
        if HAS_REF:
            ref = tl.load(ref_ptr + base + idx, mask=m, other=0.0).to(DT)
            kl, dkl = kl_term(ref, x, r, kd, kk, zero, DT, KL_TYPE, K3_TOP, K3_BELOW)
            rkl = tl.where(m, kl, zero)
            if HAS_KL:
                loss = loss + kl_coef * kl
                gt = gt + kl_coef * dkl
                if KL_TYPE == 3:  # the ratio's share: through the row's ratio (GSPO) or lr
                    if SEQ:
                        G += tl.where(m, kl_coef * kl, zero)
                    else:
                        gt = gt + tl.where(inside == 0.0, zero, kl_coef * kl)
        tl.store(grad_ptr + base + idx, tl.where(m, gt, zero), mask=inb)
        v0 = tl.sum(tl.where(m, loss, zero), axis=0).to(tl.float64)
        v1 = tl.sum(m.to(tl.int32), axis=0).to(tl.float64)
        v2 = tl.sum(nh, axis=0).to(tl.float64)
        v3 = tl.sum(nl, axis=0).to(tl.float64)
        v4 = tl.sum(nd, axis=0).to(tl.float64)
        v5 = tl.sum(tl.where(m, -lr, zero), axis=0).to(tl.float64)
        v6 = tl.sum(rkl, axis=0).to(tl.float64)
        if SEQ:  # dlw is 0 or 1: the product is exact
            v7 = (tl.sum(G, axis=0) * dlw).to(tl.float64)
        if ROW_SUM:
            p0 += v0
            p1 += v1
            p2 += v2
            p3 += v3
            p4 += v4
            p5 += v5
            p6 += v6
            if SEQ:
                p7 += v7
        else:
            tl.store(pr + k, v0)
            tl.store(pr + cs + k, v1)
            tl.store(pr + 2 * cs + k, v2)
            tl.store(pr + 3 * cs + k, v3)
            tl.store(pr + 4 * cs + k, v4)
            tl.store(pr + 5 * cs + k, v5)
            tl.store(pr + 6 * cs + k, v6)
            if SEQ:
                tl.store(pr + 7 * cs + k, v7)
    if ROW_SUM:
        tl.store(pr, p0)
        tl.store(pr + cs, p1)
        tl.store(pr + 2 * cs, p2)
        tl.store(pr + 3 * cs, p3)
        tl.store(pr + 4 * cs, p4)
        tl.store(pr + 5 * cs, p5)
        tl.store(pr + 6 * cs, p6)
        if SEQ:
            tl.store(pr + 7 * cs, p7)


@triton.jit
def _row_sums(part_ptr, r, rm, NP):
    """[RB] float64: the sums of one partial column over each row's NP partials, added in
    order (one float64 addition after another, as ROW_SUM programs add their tiles)."""
    acc = tl.zeros(r.shape, dtype=tl.float64)
    for k in range(0, NP):
        acc += tl.load(part_ptr + r * NP + k, mask=rm, other=0.0)
    return acc


@triton.jit(do_not_specialize=["nt_bits", "ns_bits", "ls_bits"])
def _policy_loss_finalize(part_ptr, loss_ptr, metrics_ptr, rs_ptr, add_ptr, B, T, NP,
                          nt_bits, ns_bits, ls_bits, AGG: tl.constexpr, SEQ: tl.constexpr,
                          DT: tl.constexpr, RB: tl.constexpr):
    """One program. part [NCOL (+1), B, NP] -> loss [] = sum_i w_i S_i / denom, metrics [6],
    row_scale [B] = w_i / denom, and for SEQ add [B] = G_i / max(L_i, 1) (the row term of
    GSPO's gradient). float64 math, rows in blocks of RB in order (like the C++ op)."""
    i0 = tl.program_id(0).to(tl.int64) * 0  # B, T == 1 may be constexprs: no .to on them
    cs = (i0 + B) * NP
    rows = tl.arange(0, RB).to(tl.int64)
    z = tl.zeros([RB], dtype=tl.float64)
    n_acc, rows_acc, sw_acc, h_acc, l_acc, d_acc, a_acc, k_acc = z, z, z, z, z, z, z, z
    for r0 in range(0, B, RB):
        r = r0 + rows
        rm = r < B
        S = _row_sums(part_ptr, r, rm, NP)
        L = _row_sums(part_ptr + cs, r, rm, NP)
        n_acc += L
        rows_acc += tl.where(L > 0.0, 1.0, 0.0)
        if AGG == 2:  # seq-mean-token-mean: each row's mean
            sw_acc += S / tl.maximum(L, 1.0)
        else:
            sw_acc += S
        h_acc += _row_sums(part_ptr + 2 * cs, r, rm, NP)
        l_acc += _row_sums(part_ptr + 3 * cs, r, rm, NP)
        d_acc += _row_sums(part_ptr + 4 * cs, r, rm, NP)
        a_acc += _row_sums(part_ptr + 5 * cs, r, rm, NP)
        k_acc += _row_sums(part_ptr + 6 * cs, r, rm, NP)
        if SEQ:
            G = _row_sums(part_ptr + 7 * cs, r, rm, NP)
            tl.store(add_ptr + r, (G / tl.maximum(L, 1.0)).to(DT), mask=rm)
    N = tl.sum(n_acc, axis=0)
    n1 = tl.maximum(N, 1.0)
    nt = _f64(nt_bits)
    if AGG == 0:  # token-mean: the given token count, else the local one
        denom = tl.where(nt <= 0.0, n1, nt)
    elif AGG == 1:
        denom = n1 * 0.0 + 1.0
    else:
        ns = _f64(ns_bits)
        denom = tl.where(ns <= 0.0, tl.maximum(tl.sum(rows_acc, axis=0), 1.0), ns)
        if AGG == 4:
            ls = _f64(ls_bits)
            denom = denom * tl.where(ls > 0.0, ls, (i0 + T).to(tl.float64))
    tl.store(loss_ptr, (tl.sum(sw_acc, axis=0) / denom).to(DT))
    tl.store(metrics_ptr + 0, (tl.sum(h_acc, axis=0) / n1).to(DT))
    tl.store(metrics_ptr + 1, (tl.sum(l_acc, axis=0) / n1).to(DT))
    tl.store(metrics_ptr + 2, (tl.sum(d_acc, axis=0) / n1).to(DT))
    tl.store(metrics_ptr + 3, (tl.sum(a_acc, axis=0) / n1).to(DT))
    tl.store(metrics_ptr + 4, (tl.sum(k_acc, axis=0) / n1).to(DT))
    tl.store(metrics_ptr + 5, N.to(DT))
    for r0 in range(0, B, RB):  # the rows' scale, now that denom is known
        r = r0 + rows
        rm = r < B
        if AGG == 2:
            w = 1.0 / tl.maximum(_row_sums(part_ptr + cs, r, rm, NP), 1.0)
        else:
            w = z + 1.0
        tl.store(rs_ptr + r, (w / denom).to(DT), mask=rm)


@triton.jit
def _gspo_add(grad_ptr, mask_ptr, add_ptr, T, NT, TPS, BLOCK: tl.constexpr):
    """GSPO: grad[i, t] += add[i] where the mask is set; grid (B, splits) as the forward."""
    i = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    base = i * T
    offs = tl.arange(0, BLOCK)
    add = tl.load(add_ptr + i)
    for k in range(j * TPS, tl.minimum(j * TPS + TPS, NT)):
        idx = k * BLOCK + offs
        inb = idx < T
        m = tl.load(mask_ptr + base + idx, mask=inb, other=0) != 0
        g = tl.load(grad_ptr + base + idx, mask=inb, other=0.0)
        tl.store(grad_ptr + base + idx, tl.where(m, g + add, g), mask=inb)


@triton.jit
def _rne_bf16(v):
    """float32 -> bfloat16 rounded to nearest even from the bits (what a GPU's cvt.rn does;
    the interpreter's own cast truncates), NaN kept NaN."""
    b = v.to(tl.uint32, bitcast=True)
    r = b + 0x7FFF + ((b >> 16) & 1)
    r = tl.where(v != v, b | 0x400000, r)
    return (r >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _policy_loss_bwd(grad_ptr, rs_ptr, gl_ptr, out_ptr, n, T, BLOCK: tl.constexpr,
                     OUT_BF16: tl.constexpr):
    """out[i, t] = grad[i, t] * (row_scale[i] * grad_loss), cast to out's dtype; flat over
    the n = B * T tokens. grad_loss is a 0-dim tensor read here (no host sync). The order of
    operations is torch's `grad * (row_scale * grad_loss)[:, None]`."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    g = tl.load(grad_ptr + offs, mask=inb, other=0.0)
    s = tl.load(rs_ptr + offs // T, mask=inb, other=0.0) * tl.load(gl_ptr).to(g.dtype)
    if OUT_BF16:
        out = _rne_bf16((g * s).to(tl.float32))
    else:
        out = (g * s).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs, out, mask=inb)


def _bits(*values):
    """float64 bit patterns of the values, as Python ints (kernel arguments by value)."""
    return np.array(values, dtype=np.float64).view(np.int64).tolist()


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    """Programs to aim for: the device's SM count on CUDA (a host-side property, cached: no
    sync), TARGET_PROGRAMS elsewhere (the interpreter)."""
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return TARGET_PROGRAMS


def tiling(B: int, T: int, device: torch.device, splits: int | None = None):
    """(BLOCK, NT tiles per row, TPS tiles per program, splits): BLOCK from T only (so a
    row's numbers do not depend on B or splits); splits programs per row so that B * splits
    reaches the target when B is small (1 when B >= target); `splits` forces a count."""
    block = min(MAX_BLOCK, max(16, triton.next_power_of_2(max(-(-T // 8), 1))))
    nt = max(1, -(-T // block))
    if splits is None:
        splits = -(-_target_programs(device) // max(B, 1))
    splits = max(1, min(int(splits), nt))
    tps = -(-nt // splits)
    return block, nt, tps, -(-nt // tps)


def policy_loss(logp, old_logp, advantages, mask, ref_logp, is_weights, clip_low: float,
                clip_high: float, dual_clip: float, kl_coef: float, kl_type: int, agg: int,
                num_tokens: float, num_seqs: float, loss_scale: float, seq_ratio: bool,
                log_ratio_clamp: float, kl_clamp: float = KL_CLAMP, splits: int | None = None):
    """Launcher, same contract as the C++ op mars::policy_loss (csrc/ops.cpp): returns
    (loss 0-dim, metrics [6], grad [B, T] unscaled, row_scale [B]), fp32 (fp64 for fp64).

    Two launches (three for GSPO), no host-to-device copy, no host sync: the options and
    the given normalisers (-1: local count) are kernel arguments. `splits` (tests) forces
    the programs per row; by default `tiling` picks them from B and the SM count."""
    B, T = logp.shape
    acc = torch.float64 if logp.dtype == torch.float64 else torch.float32
    dt = tl.float64 if acc == torch.float64 else tl.float32
    x, o, a = logp.contiguous(), old_logp.contiguous(), advantages.contiguous()
    m = mask.contiguous().view(torch.uint8)
    has_ref = ref_logp is not None
    r = ref_logp.contiguous() if has_ref else x
    has_is = is_weights is not None
    w = is_weights.contiguous() if has_is else x  # not read without weights
    for name, v in (("clip_low", clip_low), ("clip_high", clip_high), ("dual_clip", dual_clip),
                    ("kl_coef", kl_coef), ("log_ratio_clamp", log_ratio_clamp),
                    ("kl_clamp", kl_clamp),
                    ("num_tokens", num_tokens), ("num_seqs", num_seqs), ("loss_scale", loss_scale)):
        if v != v:  # the op's own contract (mars.reference.check_policy_loss_args checks all)
            raise ValueError(f"{name} must not be NaN")
    if not 0 <= kl_type <= 3:
        raise ValueError(f"kl_type must be 0, 1, 2 or 3, got {kl_type}")
    if not 0 <= agg < len(AGGS):
        raise ValueError(f"agg must be 0 .. {len(AGGS) - 1}, got {agg}")
    seq = bool(seq_ratio)
    kl_on = 0 < kl_clamp < math.inf  # k3's clamps: d to +-20, k3 to +-kl_clamp (else none)
    kd, kk = (K3_D_CLAMP, float(kl_clamp)) if kl_on else (math.inf, math.inf)
    block, nt, tps, n_split = tiling(B, T, x.device, splits)
    dev = x.device
    grad = torch.empty((B, T), dtype=acc, device=dev)
    row_sum = n_split == 1  # one program per row adds its tiles itself
    part = torch.empty((NCOL + seq, B, 1 if row_sum else nt), dtype=torch.float64, device=dev)
    row_scale = torch.empty((B,), dtype=acc, device=dev)
    add = torch.empty((B,), dtype=acc, device=dev) if seq else row_scale
    loss = torch.empty((), dtype=acc, device=dev)
    metrics = torch.empty((6,), dtype=acc, device=dev)
    warps = max(1, min(4, block // 128))
    if B > 0:
        _policy_loss_fwd[(B, n_split)](
            x, o, a, m, r, w, grad, part, B, T, nt, tps,
            *_bits(1.0 - clip_low, 1.0 + clip_high, dual_clip, kl_coef, log_ratio_clamp, kd,
                   kk),
            ADV_2D=a.dim() == 2, HAS_IS=has_is, IS_2D=has_is and w.dim() == 2,
            HAS_REF=has_ref, KL_TYPE=int(kl_type), HAS_KL=bool(kl_coef > 0 and has_ref),
            HAS_DUAL=bool(dual_clip > 0), HAS_CLAMP=bool(log_ratio_clamp > 0), SEQ=seq,
            DT=dt, BLOCK=block, K3_TOP=K3_TOP_FACTORIAL, K3_BELOW=K3_SERIES_BELOW,
            ROW_SUM=row_sum, num_warps=warps)
    rb = max(16, min(triton.next_power_of_2(max(B, 1)), 1024))
    _policy_loss_finalize[(1,)](part, loss, metrics, row_scale, add, B, T, part.shape[2],
                                *_bits(num_tokens, num_seqs, loss_scale), AGG=int(agg),
                                SEQ=seq, DT=dt, RB=rb, num_warps=4)
    if seq and B > 0 and T > 0:
        _gspo_add[(B, n_split)](grad, m, add, T, nt, tps, BLOCK=block, num_warps=warps)
    return loss, metrics, grad, row_scale


BWD_BLOCK = 1024


def policy_loss_backward(grad, row_scale, grad_loss, dtype):
    """d(loss)/d(logp) [B, T] in `dtype` (logp's) = grad * (row_scale[:, None] * grad_loss),
    one kernel: grad [B, T] and row_scale [B] are the forward's outputs (fp32 / fp64),
    grad_loss the upstream 0-dim tensor on their device (read in the kernel, never on the
    host). Bit for bit torch's `(grad * (row_scale * grad_loss)[:, None]).to(dtype)`."""
    if grad_loss.numel() != 1:
        raise ValueError(f"grad_loss must have one element, got shape {tuple(grad_loss.shape)}")
    B, T = grad.shape
    out = torch.empty((B, T), dtype=dtype, device=grad.device)
    n = B * T
    if n > 0:
        _policy_loss_bwd[(triton.cdiv(n, BWD_BLOCK),)](
            grad.contiguous(), row_scale.contiguous(), grad_loss.reshape(()), out, n, T,
            BLOCK=BWD_BLOCK, OUT_BF16=dtype == torch.bfloat16)
    return out
