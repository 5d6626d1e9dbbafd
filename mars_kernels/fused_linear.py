"""Triton epilogue of the fused lm-head loss (docs/loss.md, "Fused path").

Matches `mars.reference.token_logprobs` / `mars.reference.fused_linear_policy_loss` on one
chunk of n valid tokens whose logits x = hidden_chunk @ W^T (+ b) were written by a cuBLAS
matmul into a [n, V] fp32 buffer. One program per row (token), three kernels:

- `policy_epilogue` (token-level ratio, the default; one launch per chunk): in one
  program per row, pass 1 is an online log-sum-exp over vocab blocks of x / T (running
  max and rescaled sum in fp32 registers), logp = x[id] / T - lse; then the clipped-ratio
  loss of that token and its gradient (`mars.reference.per_token_policy_loss`: clamp,
  clip, dual clip, A == 0, importance-sampling weight, KL k1 / k2 / k3 / k3_ratio) times
  the token's aggregation weight (d aggregated loss / d token loss) gives
  g = d(loss)/d(logp); pass 2 writes dlogits = g / T * (onehot(id) - exp(x / T - lse))
  in place over the logits. Outputs lse, logp, g, the token's loss [n] fp32.
- `lse_logp` + `dlogits`: the same two passes as separate launches, for what needs the
  log-probs of whole rows before any gradient (GSPO's sequence-level ratio: g is known
  only after every chunk) and for log-probs without gradient (`token_logprobs`).

dlogits for bf16 / fp16 matmuls (GPU mixed-precision path): written as bf16 / fp16 *into
the first half of each fp32 row of the logits buffer* (a [n, V] view with row stride 2V
elements), so no second [chunk, V] buffer exists (4 bytes per logit at the peak instead
of 6) and cuBLAS reads the strided view directly (lda = 2V: no copy). Chosen over
matmuls from the fp32 dlogits, which would need an fp32 copy of the [V, H] weight (no
fp32 x bf16 GEMM) and fp32 matmul speed. Safe in place: row r's narrow values occupy
only row r's bytes (no race between programs), and the store of vocab block k covers
fp32 elements [v0 / 2, (v0 + BLOCK) / 2) of the row, all read by blocks <= k; a
`debug_barrier` between each block's load and store orders the warps of the program
(a no-op in the interpreter, which loads a whole block before storing). bf16 is rounded
to nearest even from the bits (`_rne_bf16`: a GPU's cvt.rn; the interpreter's own cast
truncates), so the interpreter gives the GPU's bits.

Launches per chunk, token-level path with a sparse mask and a bias (counted on CPU under
TRITON_INTERPRET=1: aten ops that launch a kernel on a GPU, via a TorchDispatchMode, plus
Triton launches, the chunk's policy loss forced onto its Triton backend as on a GPU; fp32,
difference of two chunk sizes): before this kernel 19 (15 aten + 4 Triton: `lse_logp`,
two copies of logp / lse, the chunk's `policy_loss` forward and finalize kernels with two
ones_like and an autograd backward of three muls, g times the aggregation weight,
`dlogits`), now 9 (8 aten + 1 Triton): gather of the hidden rows, logits matmul, bias add,
`policy_epilogue`, grad_h matmul and its scatter, grad_W addmm (one per weight-gradient
block), grad_b sum and add. The epilogue itself: 11 launches and an autograd round trip
-> 1. With every token valid the gather and the scatter go too (7).

Any V works: the last vocab block is masked (no divisibility rule, unlike verl's kernel).
Deterministic: no atomics. Runs under TRITON_INTERPRET=1 on CPU tensors.

Why a cuBLAS matmul + Triton epilogue rather than Cut Cross-Entropy's blockwise Triton
matmul with the log-sum-exp in registers: the three matmuls per chunk (logits, grad_h,
grad_W) are >95% of the FLOPs and cuBLAS runs them at tensor-core peak for any shape,
while a hand-written Triton matmul must be tuned per GPU and shape and its backward needs
atomics (non-deterministic) or a second kernel per operand. The price is one [chunk, V]
fp32 block in global memory, bounded by chunk_size (512 MiB by default on a GPU): about
14 bytes of traffic per logit (matmul writes 4, pass 1 reads 4, pass 2 reads 4 and writes
2; 16 for fp32; the token's loss adds nothing per logit) against 6 H FLOPs. Estimated on
an H100 (~3 TB/s, ~700 TFLOP/s bf16 in practice) that is ~27% on top of the matmul time
at H = 2048 and ~14% at H = 4096; what this kernel removes is the per-chunk launches and
host-side work between the matmuls, and the second [chunk, V] buffer. Estimates only: no
GPU was lent to time it; the CPU path is the same algorithm with torch's in-place
log_softmax as the epilogue and the chunk's policy loss through autograd.
"""
import math

import torch
import triton
import triton.language as tl

from mars_kernels._token_math import (K3_SERIES_BELOW, K3_TOP_FACTORIAL, clamp_log_ratio,
                                      clipped_ratio_loss, kl_term)
from mars_kernels.constants import CLIP_HIGH, CLIP_LOW, K3_D_CLAMP, KL_CLAMP, LOG_RATIO_CLAMP

KL_CODES = {"k1": 0, "k2": 1, "k3": 2, "k3_ratio": 3}


@triton.jit
def _rne_bf16(v):
    """float32 -> bfloat16 rounded to nearest even from the bits (a GPU's cvt.rn), NaN kept
    NaN (as mars_kernels.policy_loss)."""
    b = v.to(tl.uint32, bitcast=True)
    r = b + 0x7FFF + ((b >> 16) & 1)
    r = tl.where(v != v, b | 0x400000, r)
    return (r >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _row_lse(base, V, inv_temp, BLOCK_V: tl.constexpr):
    """log-sum-exp of one fp32 row / T: online over vocab blocks (fp32 registers)."""
    offs = tl.arange(0, BLOCK_V)
    m = tl.full([BLOCK_V], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_V], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        msk = v0 + offs < V
        x = tl.load(base + v0 + offs, mask=msk, other=float("-inf")).to(tl.float32) * inv_temp
        m_new = tl.maximum(m, x)
        # lanes still at -inf (masked tail lanes of a first block) shift by 0: exp(-inf) = 0
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.exp(x - m_safe)
        m = m_new
    m_row = tl.max(m, axis=0)
    return m_row + tl.log(tl.sum(s * tl.exp(m - m_row), axis=0))


@triton.jit
def _row_dlogits(base, obase, tok, lse, gs, V, inv_temp, BLOCK_V: tl.constexpr):
    """obase[v] = gs * (onehot(tok) - exp(x[v] / T - lse)), gs = g / T. A 16-bit output may
    overlap the fp32 row being read (in its first half, in place): then a barrier between
    each block's load and its store (module docstring; harmless for a separate buffer).
    The output dtype is read from the pointer at compile time (no constexpr flag)."""
    offs = tl.arange(0, BLOCK_V)
    for v0 in range(0, V, BLOCK_V):
        msk = v0 + offs < V
        x = tl.load(base + v0 + offs, mask=msk, other=0.0).to(tl.float32) * inv_temp
        d = gs * (tl.where(v0 + offs == tok, 1.0, 0.0) - tl.exp(x - lse))
        if obase.dtype.element_ty == tl.bfloat16:
            d = _rne_bf16(d)
        else:
            d = d.to(obase.dtype.element_ty)
        if obase.dtype.element_ty.primitive_bitwidth < 32:
            tl.debug_barrier()
        tl.store(obase + v0 + offs, d, mask=msk)


@triton.jit
def _lse_logp_kernel(x_ptr, stride_x, ids_ptr, lse_ptr, logp_ptr, V, inv_temp,
                     BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * stride_x
    lse = _row_lse(base, V, inv_temp, BLOCK_V)
    chosen = tl.load(base + tl.load(ids_ptr + row)).to(tl.float32) * inv_temp
    tl.store(lse_ptr + row, lse)
    tl.store(logp_ptr + row, chosen - lse)


@triton.jit
def _dlogits_kernel(x_ptr, stride_x, out_ptr, stride_out, ids_ptr, lse_ptr, g_ptr, V, inv_temp,
                    BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    lse = tl.load(lse_ptr + row).to(tl.float32)
    gs = tl.load(g_ptr + row).to(tl.float32) * inv_temp
    _row_dlogits(x_ptr + row * stride_x, out_ptr + row * stride_out, tl.load(ids_ptr + row),
                 lse, gs, V, inv_temp, BLOCK_V)


@triton.jit
def _token_loss(x, o, A, w, ref, lo, hi, dual_c, kl_coef, c, kd, kk, HAS_IS: tl.constexpr,
                HAS_KL: tl.constexpr, KL_TYPE: tl.constexpr, HAS_DUAL: tl.constexpr,
                HAS_CLAMP: tl.constexpr, K3_TOP: tl.constexpr, K3_BELOW: tl.constexpr):
    """(loss, d loss / d logp) of one valid token, fp32: mars.reference.per_token_policy_loss
    at token level, by the helpers of mars_kernels.policy_loss (mars_kernels._token_math)."""
    zero = tl.full([], 0.0, tl.float32)
    lr, inside = clamp_log_ratio(x - o, c, zero, HAS_CLAMP)
    r = tl.exp(lr)
    loss, dl, _ = clipped_ratio_loss(A, r, w, lo, hi, dual_c, zero, HAS_DUAL, HAS_IS)
    gt = dl * inside
    if HAS_KL:
        kl, dkl = kl_term(ref, x, r, kd, kk, zero, tl.float32, KL_TYPE, K3_TOP, K3_BELOW)
        loss = loss + kl_coef * kl
        gt = gt + kl_coef * dkl
        if KL_TYPE == 3:  # the ratio's share, through the clamped log-ratio
            gt = gt + tl.where(inside == 0.0, zero, kl_coef * kl)
    return loss, gt


@triton.jit
def _policy_epilogue_kernel(x_ptr, stride_x, out_ptr, stride_out, ids_ptr, lse_ptr, logp_ptr,
                            g_ptr, loss_ptr, old_ptr, adv_ptr, wagg_ptr, is_ptr, ref_ptr, V,
                            inv_temp, lo, hi, dual_c, kl_coef, c, kd, kk,
                            HAS_OLD: tl.constexpr, HAS_IS: tl.constexpr, HAS_KL: tl.constexpr,
                            KL_TYPE: tl.constexpr, HAS_DUAL: tl.constexpr,
                            HAS_CLAMP: tl.constexpr, K3_TOP: tl.constexpr,
                            K3_BELOW: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * stride_x
    tok = tl.load(ids_ptr + row)
    lse = _row_lse(base, V, inv_temp, BLOCK_V)
    x = tl.load(base + tok).to(tl.float32) * inv_temp - lse
    o = x  # on-policy (old_logp None): ratio 1, its gradient still flows
    if HAS_OLD:
        o = tl.load(old_ptr + row).to(tl.float32)
    A = tl.load(adv_ptr + row).to(tl.float32)
    w = 1.0
    if HAS_IS:
        w = tl.load(is_ptr + row).to(tl.float32)
    ref = x
    if HAS_KL:
        ref = tl.load(ref_ptr + row).to(tl.float32)
    loss, gt = _token_loss(x, o, A, w, ref, lo, hi, dual_c, kl_coef, c, kd, kk, HAS_IS,
                           HAS_KL,
                           KL_TYPE, HAS_DUAL, HAS_CLAMP, K3_TOP, K3_BELOW)
    g = gt * tl.load(wagg_ptr + row).to(tl.float32)
    tl.store(lse_ptr + row, lse)
    tl.store(logp_ptr + row, x)
    tl.store(g_ptr + row, g)
    tl.store(loss_ptr + row, loss)
    _row_dlogits(base, out_ptr + row * stride_out, tok, lse, g * inv_temp, V, inv_temp,
                 BLOCK_V)


def _block(V: int, block_v) -> int:
    if block_v is not None:
        return int(block_v)
    return min(4096, triton.next_power_of_2(V))


def _out_view(logits: torch.Tensor, out_dtype):
    """out [n, V]: logits itself (fp32, in place), or a view of out_dtype over the first
    half of each fp32 row (row stride 2 * logits.stride(0) elements)."""
    if out_dtype is None or out_dtype == logits.dtype:
        return logits
    assert logits.dtype == torch.float32 and out_dtype in (torch.bfloat16, torch.float16)
    n, V = logits.shape
    return torch.as_strided(logits.view(out_dtype), (n, V), (2 * logits.stride(0), 1))


def lse_logp(logits: torch.Tensor, ids: torch.Tensor, inv_temp: float, block_v=None):
    """logits [n, V] fp32/bf16/fp16 (row stride may exceed V), ids [n] int64 in [0, V) ->
    (lse [n], logp [n]) fp32."""
    n, V = logits.shape
    assert logits.stride(1) == 1 and ids.is_contiguous()
    lse = torch.empty(n, device=logits.device, dtype=torch.float32)
    logp = torch.empty(n, device=logits.device, dtype=torch.float32)
    if n:
        _lse_logp_kernel[(n,)](logits, logits.stride(0), ids, lse, logp, V, float(inv_temp),
                               BLOCK_V=_block(V, block_v))
    return lse, logp


def dlogits(logits: torch.Tensor, ids: torch.Tensor, lse: torch.Tensor, g: torch.Tensor,
            inv_temp: float, out: torch.Tensor | None = None, block_v=None,
            out_dtype=None) -> torch.Tensor:
    """g / T * (onehot(ids) - softmax(logits / T)) written into `out` ([n, V], any float
    dtype, not overlapping logits), or with out None in place: into `logits` (fp32), or for
    out_dtype bf16 / fp16 into the first half of each fp32 row of `logits` (returned as
    that [n, V] view). lse [n] from `lse_logp`, g [n]."""
    n, V = logits.shape
    if out is None:
        out = _out_view(logits, out_dtype)
    assert out.shape == logits.shape and out.stride(1) == 1 and logits.stride(1) == 1
    if n:
        _dlogits_kernel[(n,)](logits, logits.stride(0), out, out.stride(0), ids,
                              lse.contiguous(), g.contiguous(), V, float(inv_temp),
                              BLOCK_V=_block(V, block_v))
    return out


def policy_epilogue(logits, ids, advantages, agg_weights, *, old_logp=None, ref_logp=None,
                    is_weights=None, inv_temp=1.0, clip_low=CLIP_LOW, clip_high=CLIP_HIGH, dual_clip=None,
                    kl_coef=0.0, kl_type="k3", log_ratio_clamp=LOG_RATIO_CLAMP, kl_clamp=KL_CLAMP,
                    out_dtype=None,
                    lse=None, logp=None, block_v=None):
    """The whole epilogue of one chunk of valid tokens, one launch (token-level ratio).

    logits [n, V] fp32, row stride >= V (overwritten by dlogits); ids [n] int64 in [0, V);
    advantages, agg_weights (d aggregated loss / d token loss), old_logp (None: on-policy),
    ref_logp (read when kl_coef > 0), is_weights: [n] float, per token (row values already
    broadcast). Options validated as by mars.reference.check_policy_loss_args
    (kl_clamp None: no k3 clamp).
    out_dtype None / fp32: dlogits in place over logits; bf16 / fp16: in the first half of
    each row (module docstring). lse, logp: optional [n] fp32 outputs to write into.
    Returns (dlogits [n, V], lse [n], logp [n], g [n], loss [n]) with g = agg_weights *
    d loss / d logp and loss the token's loss (policy term, is-weight, + kl_coef * KL)."""
    n, V = logits.shape
    assert logits.dtype == torch.float32 and logits.stride(1) == 1 and ids.is_contiguous()
    if kl_type not in KL_CODES:
        raise ValueError(f"kl_type must be one of {tuple(KL_CODES)}, got {kl_type!r}")
    dev = logits.device
    out = _out_view(logits, out_dtype)
    lse = torch.empty(n, device=dev, dtype=torch.float32) if lse is None else lse
    logp = torch.empty(n, device=dev, dtype=torch.float32) if logp is None else logp
    g = torch.empty(n, device=dev, dtype=torch.float32)
    loss = torch.empty(n, device=dev, dtype=torch.float32)
    has_kl = bool(kl_coef > 0 and ref_logp is not None)
    vecs = [t if t is None else t.contiguous()
            for t in (old_logp, advantages, agg_weights, is_weights, ref_logp)]
    for t in vecs:
        assert t is None or (t.shape == (n,) and t.device == dev)
    old, adv, wagg, isw, ref = (logp if t is None else t for t in vecs)  # None: not read
    if n:
        _policy_epilogue_kernel[(n,)](
            logits, logits.stride(0), out, out.stride(0), ids, lse, logp, g, loss, old, adv,
            wagg, isw, ref, V, float(inv_temp), 1.0 - clip_low, 1.0 + clip_high,
            float(dual_clip or 0.0), float(kl_coef), float(log_ratio_clamp or 0.0),
            *((K3_D_CLAMP, float(kl_clamp)) if kl_clamp is not None and kl_clamp < math.inf
              else (math.inf, math.inf)),
            HAS_OLD=old_logp is not None, HAS_IS=is_weights is not None, HAS_KL=has_kl,
            KL_TYPE=KL_CODES[kl_type], HAS_DUAL=dual_clip is not None,
            HAS_CLAMP=log_ratio_clamp is not None, K3_TOP=K3_TOP_FACTORIAL,
            K3_BELOW=K3_SERIES_BELOW, BLOCK_V=_block(V, block_v))
    return out, lse, logp, g, loss
