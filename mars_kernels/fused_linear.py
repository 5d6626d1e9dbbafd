"""Triton epilogue of the fused lm-head loss (docs/loss.md, "Fused path").

Matches `mars.reference.token_logprobs` / `mars.reference.fused_linear_policy_loss` on one
chunk of tokens whose logits x = hidden_chunk @ W^T (+ b) were written by a cuBLAS matmul
into a [n, V] buffer (fp32). Two kernels, one program per row:

- `lse_logp`: online log-sum-exp over vocab blocks of x / temperature (running max and
  rescaled sum in fp32 registers), and the chosen id's log-prob
  logp = x[id] / temperature - lse. Reads the row once; the buffer is not modified.
- `dlogits`: d(loss)/d(x) = g / temperature * (onehot(id) - exp(x / temperature - lse)),
  g = d(loss)/d(logp) of the row, written in place or into a buffer of another dtype
  (bf16 for the gradient matmuls). Rows with g == 0 still write zeros.

Any V works: the last vocab block is masked (no divisibility rule, unlike verl's kernel).
Deterministic: no atomics. Runs under TRITON_INTERPRET=1 on CPU tensors.

Why a cuBLAS matmul + Triton epilogue rather than Cut Cross-Entropy's blockwise Triton
matmul with the log-sum-exp in registers: the three matmuls per chunk (logits, grad_h,
grad_W) are >95% of the FLOPs and cuBLAS runs them at tensor-core peak for any shape,
while a hand-written Triton matmul must be tuned per GPU and shape and its backward needs
atomics (non-deterministic) or a second kernel per operand. The price is one [chunk, V]
fp32 block in global memory, bounded by chunk_size (512 MiB by default on a GPU): about
14 bytes of traffic per logit (matmul writes 4, `lse_logp` reads 4, `dlogits` reads 4 and
writes 2) against 6 H FLOPs. Estimated on an H100 (~3 TB/s, ~700 TFLOP/s bf16 in
practice) that is ~27% on top of the matmul time at H = 2048 and ~14% at H = 4096: the
part CCE saves, traded for cuBLAS speed and determinism. Estimates only: no GPU was lent
to time it; the CPU path is the same algorithm with torch's in-place log_softmax as the
epilogue.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _lse_logp_kernel(x_ptr, stride_x, ids_ptr, lse_ptr, logp_ptr, V, inv_temp,
                     BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * stride_x
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
    s_row = tl.sum(s * tl.exp(m - m_row), axis=0)
    lse = m_row + tl.log(s_row)
    tok = tl.load(ids_ptr + row)
    chosen = tl.load(base + tok).to(tl.float32) * inv_temp
    tl.store(lse_ptr + row, lse)
    tl.store(logp_ptr + row, chosen - lse)


@triton.jit
def _dlogits_kernel(x_ptr, stride_x, out_ptr, stride_out, ids_ptr, lse_ptr, g_ptr, V, inv_temp,
                    BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * stride_x
    obase = out_ptr + row * stride_out
    offs = tl.arange(0, BLOCK_V)
    lse = tl.load(lse_ptr + row).to(tl.float32)
    gs = tl.load(g_ptr + row).to(tl.float32) * inv_temp
    tok = tl.load(ids_ptr + row)
    for v0 in range(0, V, BLOCK_V):
        msk = v0 + offs < V
        x = tl.load(base + v0 + offs, mask=msk, other=0.0).to(tl.float32) * inv_temp
        p = tl.exp(x - lse)
        d = gs * (tl.where(v0 + offs == tok, 1.0, 0.0) - p)
        tl.store(obase + v0 + offs, d.to(out_ptr.dtype.element_ty), mask=msk)


def _block(V: int, block_v) -> int:
    if block_v is not None:
        return int(block_v)
    return min(4096, triton.next_power_of_2(V))


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
            inv_temp: float, out: torch.Tensor | None = None, block_v=None) -> torch.Tensor:
    """g / T * (onehot(ids) - softmax(logits / T)) written into `out` ([n, V], any float
    dtype; default: in place into `logits`). lse [n] from `lse_logp`, g [n]."""
    n, V = logits.shape
    out = logits if out is None else out
    assert out.shape == logits.shape and out.stride(1) == 1 and logits.stride(1) == 1
    if n:
        _dlogits_kernel[(n,)](logits, logits.stride(0), out, out.stride(0), ids,
                              lse.contiguous(), g.contiguous(), V, float(inv_temp),
                              BLOCK_V=_block(V, block_v))
    return out
