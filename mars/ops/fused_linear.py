"""Fused lm-head + log-softmax + policy loss (docs/loss.md, "Fused path"): no [tokens x vocab]
logits.

`fused_linear_policy_loss(hidden, weight, ids, ...)` gives the number
`mars.reference.fused_linear_policy_loss` gives (logits materialised, then
`policy_loss`), holding at most one [chunk, V] block of logits at a time:

- Only the tokens under the mask are computed (padding costs nothing; its ids may be
  anything, e.g. -100, and its hidden states too, NaN / inf included: they are never read).
- Per chunk of tokens: logits = h_c @ W^T (+ b) into one reused buffer (cuBLAS / MKL),
  then an epilogue (Triton on the GPU, in-place torch ops on the CPU): the log-sum-exp of
  logits / temperature and the chosen token's log-prob.
- Token-level ratio (the default): the loss of a token depends on its own log-prob only,
  so d(loss)/d(logp) of the chunk is known at once: the token's loss gradient times its
  aggregation weight (the gradient of `mars.reference.aggregate_loss`, so global
  normalisers and every aggregation carry over). The same buffer then becomes
  dlogits = g / T * (onehot - softmax) and two more matmuls give grad_h (rows of this
  chunk) and grad_W (+= into an fp32 accumulator), grad_b likewise: 3 matmuls per chunk,
  one pass. Triton (GPU): lse, logp, the token loss, g and dlogits (in place; bf16 / fp16
  dlogits in the first half of each fp32 row, no second buffer) are one kernel per chunk
  (`mars_kernels.fused_linear.policy_epilogue`: 9 launches per chunk instead of 19).
  torch (CPU, backend "cpu" / "cuda"): `mars.loss.policy_loss` on the chunk
  (agg="token-sum") through autograd between the torch epilogue's steps.
- Weight gradient of a bf16 / fp16 weight: the fp32 accumulator is kept in row blocks of
  at most `_Head.grad_w_block_bytes` (128 MiB), cast back and freed one block at a time,
  so the final cast holds 4 V H + 2 V H / blocks bytes, not 6 V H (`cast_blocks`).
- Sequence-level ratio (GSPO): the gradient of a token needs its whole row, so pass 1
  keeps only log-probs and log-sum-exps [n], `policy_loss` on the [B, T] log-probs gives
  g, and pass 2 recomputes each chunk's logits for the gradients (4 matmuls per chunk;
  on Triton the two-kernel epilogue, `lse_logp` then `dlogits`, in place likewise).
- All of it runs in the forward of one autograd.Function; backward scales the stored
  gradients by grad_output in place (so a second backward through the same graph raises).
  First-order only: under create_graph=True the gradients raise when differentiated
  (`mars._ext.first_order_only`); backend="reference" gives higher-order gradients.

The loss and metrics always come from one `mars.loss.policy_loss` call on the assembled
[B, T] log-probs, so they are that function's numbers.
"""
from __future__ import annotations

import functools
import math
import warnings

import torch
from torch import nn

from . import _ext, reference
from .backends import resolve
from .policy_loss import policy_loss_checked
from .reference import CLIP_HIGH, CLIP_LOW, LOG_RATIO_CLAMP, LOSS_METRICS, LossOutput

__all__ = ["fused_linear_policy_loss", "FusedLinearMarsLoss", "token_logprobs",
           "POLICY_LOSS_OPTIONS"]

POLICY_LOSS_OPTIONS = dict(clip_low=CLIP_LOW, clip_high=CLIP_HIGH, dual_clip=None, kl_coef=0.0,
                           kl_type="k3", agg="token-mean", num_tokens=None, num_seqs=None,
                           loss_scale=None, ratio_level="token", log_ratio_clamp=LOG_RATIO_CLAMP,
                           kl_clamp=reference.KL_CLAMP)
_BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")
# chunk_size=None: the most tokens whose [chunk, V] logits block fits these bytes, but at
# least MIN_CHUNK tokens (on the 2-core CPU at H 256, V 32k, chunks of 256..1024 tokens
# take the same time within noise, 128 ~10% more: bench/results/fused_linear_cpu.md)
CPU_BLOCK_BYTES = 32 << 20
GPU_BLOCK_BYTES = 512 << 20
MIN_CHUNK = 256


# ----------------------------------------------------------------------------- checks

def _check_head(hidden, weight, ids, bias, temperature, chunk_size, backend):
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or not hidden.is_floating_point():
        raise ValueError("hidden must be a float [B, T, H] tensor, got "
                         f"{tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden)}"
                         f"{' ' + str(hidden.dtype) if isinstance(hidden, torch.Tensor) else ''}")
    B, T, H = hidden.shape
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError("weight must be a float [V, H] tensor (the lm-head weight)")
    if weight.shape[1] != H:
        raise ValueError(f"weight must be [V, H] with H = hidden.shape[-1] = {H}, got "
                         f"{list(weight.shape)}")
    if weight.shape[0] < 1:
        raise ValueError("weight must have at least one vocabulary row")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same "
                         "dtype (no silent upcast of a [V, H] weight): cast one, e.g. "
                         "hidden.to(weight.dtype)")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex() \
            or ids.dtype == torch.bool:
        raise ValueError(f"ids must be an integer tensor, got "
                         f"{ids.dtype if isinstance(ids, torch.Tensor) else type(ids)}")
    if tuple(ids.shape) != (B, T):
        raise ValueError(f"ids must be [B, T] = {[B, T]}, got {list(ids.shape)}")
    if ids.device != hidden.device:
        raise ValueError(f"ids is on {ids.device} but hidden is on {hidden.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must be None or a [V] = [{weight.shape[0]}] tensor")
        if bias.dtype != weight.dtype or bias.device != weight.device:
            raise ValueError(f"bias must have weight's dtype and device ({weight.dtype}, "
                             f"{weight.device}), got {bias.dtype}, {bias.device}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")


def _use_triton(backend: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Triton epilogue: asked for, or "auto" on a GPU. fp64 always uses the torch epilogue."""
    if backend == "triton":
        if not _ext.HAS_TRITON:
            raise RuntimeError(f"backend 'triton' is not available: {_ext.TRITON_ERROR}")
        _ext.require_triton_cpu(device)
        return dtype != torch.float64
    return backend == "auto" and device.type == "cuda" and _ext.HAS_TRITON \
        and dtype != torch.float64


def _valid_positions(mask, B, T, device):
    if mask is None:
        return torch.arange(B * T, device=device)
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (B, T):
        raise ValueError(f"mask must be a [B, T] = {[B, T]} tensor, got "
                         f"{list(mask.shape) if isinstance(mask, torch.Tensor) else type(mask)}")
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device} but hidden is on {device}")
    valid = mask if mask.dtype == torch.bool else mask != 0
    return valid.reshape(-1).nonzero().squeeze(1)


# ----------------------------------------------------------------------------- the head

def _mm_out_dtype(a, b, out):
    """out = a @ b with bf16/fp16 a, b and a float32 out: cuBLAS's mixed-precision matmul
    (torch.mm(..., out_dtype=)) on a GPU. On the CPU, which has none, its exact twin:
    products of bf16/fp16 values are exact in float32 (reached only when a test forces the
    GPU's code path on CPU, _Head.upcast_half_on_cpu = False)."""
    if out.device.type == "cpu":
        return torch.mm(a.to(out.dtype), b.to(out.dtype), out=out)
    return torch.mm(a, b, out_dtype=out.dtype, out=out)


def _addmm_out_dtype(acc, a, b):
    """acc += a @ b, acc float32, a and b bf16/fp16 (as _mm_out_dtype)."""
    if acc.device.type == "cpu":
        return acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))
    return torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)


@functools.lru_cache(maxsize=None)
def _mixed_mm_unsupported(device: torch.device, dtype: torch.dtype):
    """None when `device` has an exact dtype x dtype -> float32 matmul (the two calls above:
    logits and the weight gradient), else why not. Probed once per (device, dtype) on 16 x 16
    tensors, the values checked. Only the errors of a missing kernel are caught (TypeError:
    no out_dtype in this torch; RuntimeError / NotImplementedError: no kernel for this
    device or dtype); out-of-memory is raised, never taken for a missing kernel."""
    x = torch.full((16, 16), 0.5, dtype=dtype, device=device)
    try:
        out = _mm_out_dtype(x, x, torch.empty(16, 16, dtype=torch.float32, device=device))
        acc = _addmm_out_dtype(torch.ones(16, 16, dtype=torch.float32, device=device), x, x)
    except torch.OutOfMemoryError:
        raise
    except (TypeError, RuntimeError, NotImplementedError) as exc:
        first = (str(exc).splitlines() or [""])[0][:200]
        return f"{type(exc).__name__}: {first}"
    if out.dtype != torch.float32 or not bool((out == 4.0).all() & (acc == 5.0).all()):
        return "torch.mm(..., out_dtype=torch.float32) gave wrong values"
    return None


@functools.lru_cache(maxsize=None)
def _warn_upcast(device: str, dtype: torch.dtype, why: str):
    warnings.warn(
        f"mars fused loss: no exact {dtype} x {dtype} -> float32 matmul on {device} ({why}). "
        "The fused loss runs its matmuls on float32 copies instead: exact log-probs and "
        "gradients, but float32 matmul speed and a float32 copy of the [V, H] weight "
        f"(4 V H bytes) per call. A torch with torch.mm(..., out_dtype=) for {dtype} on this "
        "device (2.7 or later on sm_80+) runs the fast exact path.",
        RuntimeWarning, stacklevel=4)


def _mm_into(a, b, out):
    """out = a @ b, out may have a wider dtype than a and b (fp32 accumulation: only after
    `_mixed_mm_unsupported` said this device has it)."""
    if a.dtype == out.dtype:
        return torch.mm(a, b, out=out)
    return _mm_out_dtype(a, b, out)


def _addmm_into(acc, a, b):
    """acc += a @ b with acc fp32 (or fp64) and a, b possibly bf16/fp16 (as _mm_into)."""
    if a.dtype == acc.dtype:
        return acc.addmm_(a, b)
    return _addmm_out_dtype(acc, a, b)


class _Head:
    """The lm head over the valid tokens: chunked logits, log-probs and gradients."""

    # bf16/fp16 on CPU: matmuls on fp32 copies (CPU has no bf16 x bf16 -> fp32 matmul).
    # Tests set it False to run the GPU's mixed-precision code path on CPU.
    upcast_half_on_cpu = True

    @classmethod
    def _upcast(cls, device, dtype) -> bool:
        """Whether bf16/fp16 matmuls run on float32 copies: on the CPU by design; on a GPU
        only when it has no exact mixed-precision matmul, said once by a RuntimeWarning."""
        if device.type == "cpu" and cls.upcast_half_on_cpu:
            return True
        why = _mixed_mm_unsupported(device, dtype)
        if why is None:
            return False
        _warn_upcast(str(device), dtype, why)
        return True

    def __init__(self, hidden, weight, bias, ids, idx, temperature, chunk_size, triton,
                 need_h=False, need_w=False, need_b=False):
        B, T, H = hidden.shape
        self.V = V = weight.shape[0]
        self.device = hidden.device
        self.h = hidden.reshape(B * T, H)
        self.idx, self.n = idx, idx.numel()
        self.dense = self.n == B * T  # every token valid: chunks are row slices
        self.ids = ids.reshape(-1).index_select(0, idx).long()
        if self.n:
            lo, hi = torch.stack(torch.aminmax(self.ids)).tolist()  # one host sync
            if lo < 0 or hi >= V:
                raise ValueError(f"ids must be in [0, V) = [0, {V}) at unmasked positions, got "
                                 f"values in [{lo}, {hi}]")
        self.acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        self.half = hidden.dtype not in (torch.float32, torch.float64)
        self.upcast = self.half and self._upcast(self.device, hidden.dtype)
        self.W = weight.detach()
        self.Wmm = self.W.to(self.acc) if self.upcast else self.W
        self.b = None if bias is None else bias.detach().to(self.acc)
        self.inv_t = 1.0 / float(temperature)
        self.triton = triton
        itemsize = torch.finfo(self.acc).bits // 8
        if chunk_size is None:
            budget = GPU_BLOCK_BYTES if self.device.type == "cuda" else CPU_BLOCK_BYTES
            chunk_size = max(MIN_CHUNK, budget // (V * itemsize))
            chunk_size -= chunk_size % 64
        self.chunk = max(1, min(chunk_size, self.n))
        self.buf = torch.empty(self.chunk, V, dtype=self.acc, device=self.device) if self.n else None
        # dlogits in the matmul dtype for the two gradient matmuls (GPU bf16/fp16): the
        # Triton epilogue writes them in place, in the first half of each fp32 row of buf
        # (mars_kernels.fused_linear); the torch epilogue into a second buffer
        self.narrow = hidden.dtype if self.half and not self.upcast else None
        self.dbuf = (torch.empty(self.chunk, V, dtype=hidden.dtype, device=self.device)
                     if self.narrow is not None and not triton and (need_h or need_w) and self.n
                     else None)
        self.grad_h = None
        if need_h:  # padding rows stay 0; with every token valid each row is written
            self.grad_h = (torch.empty_like if self.dense and self.n else torch.zeros_like)(self.h)
        self.grad_w = None  # fp32 accumulator: a list of row blocks [v0:v1, H]
        if need_w:  # written by the first chunk's matmul; zeros when no token is valid
            self.w_rows = self._w_block_rows(V, H, weight.dtype)
            self.grad_w = [(torch.empty if self.n else torch.zeros)(
                min(v0 + self.w_rows, V) - v0, H, dtype=self.acc, device=self.device)
                for v0 in range(0, V, self.w_rows)]
        self.grad_w_empty = bool(self.n)
        self.grad_b = torch.zeros(V, dtype=self.acc, device=self.device) if need_b else None
        self.need_grad = need_h or need_w or need_b

    # The weight gradient's fp32 accumulator is cut into row blocks of at most this many
    # bytes when it is cast back to a narrower weight dtype: each block is cast and freed in
    # turn, so the cast holds 4 V H + 2 V H / blocks bytes at once instead of 6 V H (then
    # torch.cat of the bf16 blocks: 4 V H). Each chunk then runs one grad_W addmm per block.
    grad_w_block_bytes = 128 << 20

    def _w_block_rows(self, V, H, wdtype) -> int:
        """Rows per weight-gradient block: all V (one block) unless the gradient is cast
        back to a narrower dtype and the accumulator exceeds grad_w_block_bytes."""
        if wdtype == self.acc:
            return V
        itemsize = torch.finfo(self.acc).bits // 8
        blocks = max(1, min(V, -(-(V * H * itemsize) // max(1, self.grad_w_block_bytes))))
        return -(-V // blocks)

    def grad_weight(self, dtype):
        """The weight gradient [V, H] in `dtype`, consuming the fp32 blocks (each freed as
        soon as it is cast: see grad_w_block_bytes)."""
        blocks, self.grad_w = self.grad_w, None
        return cast_blocks(blocks, dtype)

    def chunks(self):
        return [(c0, min(c0 + self.chunk, self.n)) for c0 in range(0, self.n, self.chunk)]

    def _logits(self, c0, c1):
        rows = slice(c0, c1) if self.dense else self.idx[c0:c1]
        hc = self.h[rows] if self.dense else self.h.index_select(0, rows)
        if self.upcast:
            hc = hc.to(self.acc)
        buf = self.buf[: c1 - c0]
        _mm_into(hc, self.Wmm.t(), buf)
        if self.b is not None:
            buf.add_(self.b)
        return rows, hc, buf

    def _log_softmax_(self, buf):
        """buf := log_softmax(buf / T) in place (torch's fused row kernel: one pass that
        stays in cache per row, instead of separate max / sub / exp / sum passes)."""
        if self.inv_t != 1.0:
            buf.mul_(self.inv_t)
        torch._log_softmax(buf, 1, False, out=buf)

    def _lse_logp(self, buf, ids_c):
        """(lse, logp, in_log_space). Triton: buf unchanged. torch: buf := log_softmax,
        in place."""
        if self.triton:
            from mars_kernels import fused_linear as K
            lse, logp = K.lse_logp(buf, ids_c, self.inv_t)
            return lse, logp, False
        chosen = buf.gather(1, ids_c[:, None])[:, 0] * self.inv_t
        self._log_softmax_(buf)
        logp = buf.gather(1, ids_c[:, None])[:, 0]
        return chosen - logp, logp, True

    def _dlogits(self, buf, ids_c, lse, g, in_log_space):
        """dlogits = g / T * (onehot - softmax), from the log-softmax left by `_lse_logp`
        or from raw logits (pass 2)."""
        if self.triton:  # in place (bf16 / fp16: in the first half of each fp32 row)
            from mars_kernels import fused_linear as K
            return K.dlogits(buf, ids_c, lse, g, self.inv_t, out_dtype=self.narrow)
        out = buf if self.dbuf is None else self.dbuf[: buf.shape[0]]
        gs = (g * self.inv_t).to(buf.dtype)
        if not in_log_space:
            self._log_softmax_(buf)
        buf.exp_().mul_(-gs[:, None])
        buf.scatter_add_(1, ids_c[:, None], gs[:, None])
        return out if out is buf else out.copy_(buf)

    def _grads(self, rows, hc, dl):
        if self.grad_h is not None:
            W = self.Wmm if dl.dtype == self.Wmm.dtype else self.W
            if self.dense and self.grad_h.dtype == dl.dtype:
                torch.mm(dl, W, out=self.grad_h[rows])
            elif self.dense:
                self.grad_h[rows] = torch.mm(dl, W)
            else:
                self.grad_h.index_copy_(0, rows, torch.mm(dl, W).to(self.grad_h.dtype))
        if self.grad_w is not None:
            hc = hc if hc.dtype == dl.dtype else hc.to(dl.dtype)
            for k, blk in enumerate(self.grad_w):  # first chunk writes, the others accumulate
                v0 = k * self.w_rows
                dlt = dl[:, v0:v0 + blk.shape[0]].t()
                (_mm_into(dlt, hc, blk) if self.grad_w_empty else _addmm_into(blk, dlt, hc))
            self.grad_w_empty = False
        if self.grad_b is not None:
            self.grad_b.add_(dl.sum(0, dtype=self.acc))

    def logprobs(self, g_of_chunk=None, epilogue=None):
        """Pass 1 over the valid tokens: (logp [n], lse [n]) in the accumulation dtype.
        With g_of_chunk(c0, c1, logp_c) -> g_c, also the gradients (single pass). With
        epilogue (Triton, token-level ratio: the per-token inputs [n] and the options of
        `mars_kernels.fused_linear.policy_epilogue`), the same in one kernel per chunk."""
        logp = torch.empty(self.n, dtype=self.acc, device=self.device)
        lse = torch.empty(self.n, dtype=self.acc, device=self.device)
        for c0, c1 in self.chunks():
            ids_c = self.ids[c0:c1]
            rows, hc, buf = self._logits(c0, c1)
            if epilogue is not None and self.need_grad:
                from mars_kernels import fused_linear as K
                vec, options = epilogue
                vec_c = {k: None if v is None else v[c0:c1] for k, v in vec.items()}
                dl = K.policy_epilogue(buf, ids_c, **vec_c, inv_temp=self.inv_t,
                                       out_dtype=self.narrow, lse=lse[c0:c1],
                                       logp=logp[c0:c1], **options)[0]
                self._grads(rows, hc, dl)
                continue
            lse_c, logp_c, state = self._lse_logp(buf, ids_c)
            logp[c0:c1] = logp_c
            lse[c0:c1] = lse_c
            if g_of_chunk is not None and self.need_grad:
                g = g_of_chunk(c0, c1, logp[c0:c1])
                self._grads(rows, hc, self._dlogits(buf, ids_c, lse_c, g, state))
        return logp, lse

    def backward_pass(self, lse, g):
        """Pass 2 (sequence-level ratio): recompute logits per chunk, gradients from g [n]."""
        for c0, c1 in self.chunks():
            ids_c = self.ids[c0:c1]
            rows, hc, buf = self._logits(c0, c1)
            self._grads(rows, hc, self._dlogits(buf, ids_c, lse[c0:c1], g[c0:c1], False))

    def release(self):
        self.buf = self.dbuf = None


def cast_blocks(blocks: list, dtype) -> torch.Tensor:
    """torch.cat(blocks).to(dtype), emptying the list as it goes: each block is cast, then
    dropped (freed when nothing else holds it), so at most one cast block exists beyond
    what is left of the inputs. One block: that block cast (itself if dtype matches)."""
    if len(blocks) == 1:
        return blocks.pop().to(dtype)
    parts = []
    while blocks:
        parts.append(blocks.pop(0).to(dtype))
    return torch.cat(parts)


# ----------------------------------------------------------------------------- the loss

def _gather(t, idx, T, per_row=False):
    if t is None:
        return None
    t = t.detach()
    if per_row:
        return t.index_select(0, torch.div(idx, T, rounding_mode="floor"))
    return t.reshape(-1).index_select(0, idx)


def _aggregation_weights(mask, opts, dtype):
    """d(aggregated loss) / d(per-token loss) [B, T]: the gradient of
    `mars.reference.aggregate_loss` (linear in the per-token losses), so every aggregation
    and global normaliser has a single definition."""
    valid = mask if mask.dtype == torch.bool else mask != 0
    z = torch.zeros(valid.shape, dtype=dtype, device=valid.device, requires_grad=True)
    with torch.enable_grad():
        agg = reference.aggregate_loss(z, valid, opts["agg"], opts["num_tokens"],
                                       opts["num_seqs"], opts["loss_scale"])
        (w,) = torch.autograd.grad(agg, z)
    return w


def _fused_run(hidden, weight, bias, ids, old_logp, advantages, mask, ref_logp, temperature,
               chunk_size, backend, opts, need, is_weights=None):
    """(loss, metrics [6], grad_hidden, grad_weight, grad_bias); grads None where not needed.
    opts: validated by check_policy_loss_args (normalisers already checked)."""
    run_loss = policy_loss_checked
    B, T, _ = hidden.shape
    pl_backend = resolve(backend if backend != "triton" or hidden.device.type == "cuda"
                         else "auto", hidden.device)
    triton = _use_triton(backend, hidden.device, hidden.dtype)
    idx = _valid_positions(mask, B, T, hidden.device)
    head = _Head(hidden, weight, bias, ids, idx, temperature, chunk_size, triton, *need)
    acc = head.acc
    token_level = opts["ratio_level"] == "token"
    full_mask = mask

    g_of_chunk = None
    if token_level and head.need_grad:
        w = _aggregation_weights(mask, opts, acc).reshape(-1).index_select(0, idx)
        old_v = _gather(old_logp, idx, T)
        ref_v = _gather(ref_logp, idx, T)
        adv_v = _gather(advantages, idx, T, per_row=advantages.dim() == 1)
        isw_v = None if is_weights is None else _gather(is_weights, idx, T,
                                                        per_row=is_weights.dim() == 1)
        tok_opts = {**opts, "agg": "token-sum", "num_tokens": None, "num_seqs": None,
                    "loss_scale": None}

        def g_of_chunk(c0, c1, logp_c):
            x = logp_c.detach()[None].requires_grad_(True)
            with torch.enable_grad():
                out = run_loss(
                    pl_backend, x, x.detach() if old_v is None else old_v[None, c0:c1],
                    adv_v[None, c0:c1], torch.ones_like(x, dtype=torch.bool),
                    None if ref_v is None else ref_v[None, c0:c1], tok_opts,
                    None if isw_v is None else isw_v[None, c0:c1])
                (g,) = torch.autograd.grad(out.loss, x)
            return g[0].to(acc) * w[c0:c1]

    epilogue = None
    if g_of_chunk is not None and triton:  # the whole epilogue in one kernel per chunk
        epilogue = (dict(advantages=adv_v, agg_weights=w, old_logp=old_v, ref_logp=ref_v,
                         is_weights=isw_v),
                    {k: opts[k] for k in ("clip_low", "clip_high", "dual_clip", "kl_coef",
                                          "kl_type", "log_ratio_clamp", "kl_clamp")})
        g_of_chunk = None
    logp_v, lse_v = head.logprobs(g_of_chunk, epilogue)
    logp = torch.zeros(B * T, dtype=acc, device=hidden.device)
    logp.index_copy_(0, idx, logp_v)
    logp = logp.reshape(B, T)
    old = logp.detach() if old_logp is None else old_logp
    if token_level or not head.need_grad:
        head.release()
        with torch.no_grad():
            out = run_loss(pl_backend, logp, old, advantages, full_mask, ref_logp, opts,
                           is_weights)
    else:  # GSPO: g needs whole rows; second pass over the chunks
        x = logp.requires_grad_(True)
        with torch.enable_grad():
            out = run_loss(pl_backend, x, old, advantages, full_mask, ref_logp, opts, is_weights)
            (g,) = torch.autograd.grad(out.loss, x)
        head.backward_pass(lse_v, g.reshape(-1).index_select(0, idx).to(acc))
        head.release()
    loss = out.loss.detach()
    metrics = torch.stack([out.metrics[k].detach().to(loss.dtype) for k in LOSS_METRICS])
    gh = None if head.grad_h is None else head.grad_h.reshape(hidden.shape)
    gw = None if head.grad_w is None else head.grad_weight(weight.dtype)  # cast once, in blocks
    gb = None if head.grad_b is None else head.grad_b.to(bias.dtype)
    return loss, metrics, gh, gw, gb


class _FusedLinearPolicyLossFn(torch.autograd.Function):
    """Gradients computed in the forward; backward scales them by grad_output. First order
    only (first_order_only: a backward through this backward raises)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, run):
        need = tuple(ctx.needs_input_grad[:3])
        loss, metrics, gh, gw, gb = run(need)
        ctx.mark_non_differentiable(metrics)
        ctx.save_for_backward(gh, gw, gb)
        return loss, metrics

    @staticmethod
    def backward(ctx, grad_loss, _grad_metrics):
        grads = ctx.saved_tensors
        # in place: the saved gradients are used once (a second backward raises on the
        # version counter instead of returning scaled-twice gradients)
        with torch.no_grad():
            out = [None if t is None else t.mul_(grad_loss.to(t.dtype)) for t in grads]
        out = _ext.first_order_only(tuple(out), "the fused loss (backend auto / cpu / cuda / "
                                    "triton)")
        return out[0], out[1], out[2], None


def fused_linear_policy_loss(hidden, weight, ids, old_logp, advantages, mask, *, bias=None,
                             temperature=1.0, chunk_size=None, ref_logp=None, is_weights=None,
                             clip_low=CLIP_LOW,
                             clip_high=CLIP_HIGH, dual_clip=None, kl_coef=0.0, kl_type="k3",
                             agg="token-mean", num_tokens=None, num_seqs=None, loss_scale=None,
                             ratio_level="token", log_ratio_clamp=LOG_RATIO_CLAMP,
                             kl_clamp=reference.KL_CLAMP, backend="auto") -> LossOutput:
    """Policy loss of the lm head's log-probs, never holding [B*T, V] logits (docs/loss.md,
    "Fused path").

    Equals `mars.loss.policy_loss(logp, old_logp, advantages, mask, **options)` with
    logp = log_softmax((hidden @ weight^T + bias) / temperature)[ids] (see
    `mars.reference.fused_linear_policy_loss`), with gradients for hidden, weight and bias.

    Args:
        hidden: [B, T, H] last hidden states of the response tokens (position t predicts
            ids[:, t]); fp32, bf16, fp16 or fp64.
        weight: [V, H] lm-head weight, same dtype and device as hidden (a mismatch raises
            ValueError rather than silently upcasting a [V, H] tensor).
        ids: [B, T] integer ids of the chosen tokens; in [0, V) where mask is set, anything
            (e.g. -100) elsewhere.
        old_logp, advantages, mask, ref_logp, is_weights and the keyword options: as
            `mars.loss.policy_loss` (all aggregations, global normalisers, KL, dual clip,
            importance-sampling weights, GSPO via ratio_level="sequence").
        bias: optional [V] lm-head bias.
        temperature: logits are divided by it before the softmax (as during sampling).
        chunk_size: tokens per [chunk, V] logits block (None: a block of up to 32 MiB on
            CPU, 512 MiB on a GPU, at least 256 tokens). Peak extra memory ~ chunk * V * 4
            bytes (+ chunk * V * 2 for bf16/fp16 on a GPU with the torch epilogue; none with
            the Triton one) + an fp32 [V, H] weight-gradient accumulator (+ one cast block of
            it at the end, bf16/fp16 weights) + the [B*T, H] hidden gradient.
        backend: "auto" (Triton epilogue on a GPU, torch on CPU) | "triton" | "cpu" |
            "cuda" (torch epilogue; the policy loss on that backend) | "reference"
            (materialised logits; the only one with higher-order gradients).

    Masked positions (mask False) contribute nothing to the loss or to any gradient, even
    if their hidden states are NaN / inf or their ids out of range.

    Returns:
        LossOutput(loss 0-dim fp32 (fp64 for fp64 inputs), metrics dict as policy_loss).
        Gradients are computed during this call; loss.backward() only scales them.
    """
    opts = dict(clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, kl_coef=kl_coef,
                kl_type=kl_type, agg=agg, num_tokens=num_tokens, num_seqs=num_seqs,
                loss_scale=loss_scale, ratio_level=ratio_level, log_ratio_clamp=log_ratio_clamp,
                kl_clamp=kl_clamp)
    _check_head(hidden, weight, ids, bias, temperature, chunk_size, backend)
    if backend == "reference":
        return reference.fused_linear_policy_loss(hidden, weight, ids, old_logp, advantages, mask,
                                                  bias=bias, temperature=temperature,
                                                  ref_logp=ref_logp, is_weights=is_weights, **opts)
    B, T, _ = hidden.shape
    # stands for logp: shape, device and the loss's dtype (fp64 for fp64 hidden)
    dummy = hidden.new_empty((B, T), dtype=torch.float64 if hidden.dtype == torch.float64
                             else torch.float32)
    opts = reference.check_policy_loss_args(dummy, dummy if old_logp is None else old_logp,
                                            advantages, mask, ref_logp, is_weights=is_weights,
                                            **opts)

    def run(need):
        return _fused_run(hidden, weight, bias, ids, old_logp, advantages, mask, ref_logp,
                          temperature, chunk_size, backend, opts, need, is_weights)

    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (hidden, weight, bias)):
        loss, metrics = _FusedLinearPolicyLossFn.apply(hidden, weight, bias, run)
    else:
        loss, metrics, *_ = run((False, False, False))
    return LossOutput(loss, {k: metrics[j] for j, k in enumerate(LOSS_METRICS)})


@torch.no_grad()
def token_logprobs(hidden, weight, ids, *, bias=None, temperature=1.0, mask=None,
                   chunk_size=None, backend="auto"):
    """Log-probs [B, T] of the chosen ids under softmax((hidden @ W^T + b) / temperature),
    chunked (no [B*T, V] logits) and without gradient: for old / reference log-probs.
    fp32 (fp64 for fp64 hidden). Positions outside `mask` (optional) are 0 and their ids may
    be anything. Same numbers as `mars.reference.token_logprobs`."""
    _check_head(hidden, weight, ids, bias, temperature, chunk_size, backend)
    if backend == "reference":
        return reference.token_logprobs(hidden, weight, ids, bias=bias, temperature=temperature,
                                        mask=mask)
    B, T, _ = hidden.shape
    idx = _valid_positions(mask, B, T, hidden.device)
    head = _Head(hidden, weight, bias, ids, idx, temperature, chunk_size,
                 _use_triton(backend, hidden.device, hidden.dtype))
    logp_v, _ = head.logprobs()
    out = torch.zeros(B * T, dtype=head.acc, device=hidden.device)
    return out.index_copy_(0, idx, logp_v).reshape(B, T)


class FusedLinearMarsLoss(nn.Module):
    """`fused_linear_policy_loss` as a module, options fixed at construction.

    >>> crit = FusedLinearMarsLoss(clip_high=0.28, temperature=1.0)
    >>> out = crit(hidden, model.lm_head.weight, ids, old_logp, advantages, mask)
    >>> out.loss.backward()
    """

    def __init__(self, *, temperature=1.0, chunk_size=None, clip_low=CLIP_LOW, clip_high=CLIP_HIGH,
                 dual_clip=None, kl_coef=0.0, kl_type="k3", agg="token-mean", loss_scale=None,
                 ratio_level="token", log_ratio_clamp=LOG_RATIO_CLAMP, kl_clamp=reference.KL_CLAMP,
                 backend="auto"):
        super().__init__()
        self.options = dict(temperature=temperature, chunk_size=chunk_size, clip_low=clip_low,
                            clip_high=clip_high, dual_clip=dual_clip, kl_coef=kl_coef,
                            kl_type=kl_type, agg=agg, loss_scale=loss_scale,
                            ratio_level=ratio_level, log_ratio_clamp=log_ratio_clamp,
                            kl_clamp=kl_clamp, backend=backend)
        pl = {k: v for k, v in self.options.items()
              if k not in ("temperature", "chunk_size", "backend")}
        reference.check_policy_loss_options(**pl)
        _check_head(torch.zeros(1, 1, 1), torch.zeros(1, 1), torch.zeros(1, 1, dtype=torch.long),
                    None, temperature, chunk_size, backend)

    def forward(self, hidden, weight, ids, old_logp, advantages, mask, bias=None, ref_logp=None,
                num_tokens=None, num_seqs=None, is_weights=None) -> LossOutput:
        return fused_linear_policy_loss(hidden, weight, ids, old_logp, advantages, mask,
                                        bias=bias, ref_logp=ref_logp, num_tokens=num_tokens,
                                        num_seqs=num_seqs, is_weights=is_weights, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
