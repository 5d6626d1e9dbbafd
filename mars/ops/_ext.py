"""Loads the compiled extension (`mars._C`) and the Triton kernels, and registers with
`torch.library` what C++ does not: fake (meta) implementations, so the ops trace under
`torch.compile`, and the Triton launchers as custom ops. Records why a backend is missing.
"""
from __future__ import annotations

import importlib.util
import os

import torch
from mars_kernels.constants import KL_CLAMP

C_ERROR: str | None = None
try:
    from .. import _C  # noqa: F401  (mars._C; loading it runs TORCH_LIBRARY(mars, ...))
except ImportError as exc:  # not built: `pip install --no-build-isolation .`
    C_ERROR = f"compiled extension mars._C not importable ({exc}); build it with " \
              "`pip install --no-build-isolation .`"

# Triton itself is imported on first use only: TRITON_INTERPRET must be settled before.
TRITON_ERROR: str | None = None
if importlib.util.find_spec("triton") is None:
    TRITON_ERROR = "triton is not installed (pip install 'mars[triton]')"

HAS_C = C_ERROR is None
# Asked of the dispatcher once, so it is true of the library actually loaded (a build
# record in the source tree can be stale), and so torch.compile sees a constant.
HAS_CUDA_KERNELS = HAS_C and torch._C._dispatch_has_kernel_for_dispatch_key(
    "mars::mono_anchored_advantage", "CUDA")
HAS_TRITON = TRITON_ERROR is None


def triton_interpret() -> bool:
    """True when Triton kernels run on the CPU through the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Triton 3.6's interpreter (torch 2.11's pin) fails on a loop whose bounds are loaded values
# ("only 0-dimensional arrays can be converted to Python scalars"), which every mars kernel
# has; 3.7 runs them. Compiled for a GPU, any triton >= 3.0 does.
MIN_INTERPRETER_TRITON = (3, 7)


def _installed_version(name: str) -> str | None:
    """The installed distribution's version, read once here: not under torch.compile (dynamo
    cannot trace importlib.metadata), and without importing the package."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:  # not installed, or a source build without metadata
        return None


def interpreter_error(triton_version: str | None) -> str | None:
    """Why the interpreter of this triton version cannot run the mars kernels, or None."""
    if triton_version is None:
        return None
    parts = tuple(int(p) if p.isdigit() else 0 for p in triton_version.split("+")[0].split(".")[:2])
    if parts >= MIN_INTERPRETER_TRITON:
        return None
    return (f"triton {triton_version}'s interpreter cannot run the mars kernels (loops with loaded "
            f"bounds fail before 3.7); pip install 'triton>=3.7' to run them on the CPU (on a GPU "
            f"they compile with any triton >= 3.0)")


TRITON_VERSION = _installed_version("triton") if HAS_TRITON else None
# a constant, so that torch.compile reads it instead of tracing the version parsing
TRITON_INTERPRETER_ERROR = interpreter_error(TRITON_VERSION)


def triton_cpu_error() -> str | None:
    """Why the Triton kernels cannot run on CPU tensors here, or None when they can (the
    interpreter is on and its triton runs them)."""
    if not HAS_TRITON:
        return TRITON_ERROR
    if not triton_interpret():
        return "needs TRITON_INTERPRET=1 (set before triton is imported)"
    return TRITON_INTERPRETER_ERROR


def require_triton_cpu(device: torch.device) -> None:
    """RuntimeError naming why, when the Triton kernels cannot take tensors on ``device``
    here (CPU without a usable interpreter); nothing for a GPU."""
    if device.type == "cpu":
        why = triton_cpu_error()
        if why:
            raise RuntimeError(f"backend 'triton' on CPU tensors: {why}")


def _advantage_fake_impl(rewards, num_groups):
    """Shapes of (advantages [B], mean [G], std [G], count [G], gain [G])."""
    adv = rewards.new_empty(rewards.shape, dtype=torch.float32)
    mean, std, gain = (rewards.new_empty((num_groups,), dtype=torch.float32) for _ in range(3))
    return adv, mean, std, rewards.new_empty((num_groups,), dtype=torch.long), gain


if HAS_C:
    @torch.library.register_fake("mars::mono_anchored_advantage")
    def _advantage_fake(rewards, group_index, anchor_rewards, anchor_index, num_groups,
                        norm_by_std, eps, unbiased, singleton_raw):
        return _advantage_fake_impl(rewards, num_groups)


if HAS_TRITON:
    @torch.library.custom_op("mars::mono_anchored_advantage_triton", mutates_args=())
    def advantage_triton(rewards: torch.Tensor, group_index: torch.Tensor,
                         anchor_rewards: torch.Tensor, anchor_index: torch.Tensor,
                         num_groups: int, norm_by_std: bool, eps: float, unbiased: bool,
                         singleton_raw: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                       torch.Tensor, torch.Tensor]:
        from mars_kernels.advantage import mono_anchored_advantage
        return mono_anchored_advantage(rewards, group_index, anchor_rewards, anchor_index,
                                       num_groups, norm_by_std, eps, unbiased, singleton_raw)

    @advantage_triton.register_fake
    def _advantage_triton_fake(rewards, group_index, anchor_rewards, anchor_index, num_groups,
                               norm_by_std, eps, unbiased, singleton_raw):
        return _advantage_fake_impl(rewards, num_groups)


# --- mars::policy_loss (docs/loss.md; schema in csrc/ops.cpp) -----------------------------

HIGHER_ORDER_MESSAGE = (
    "mars: {what} gives first-order gradients only: a backward through its backward "
    "(torch.autograd.grad(..., create_graph=True) followed by another backward, e.g. a "
    "gradient penalty or a Hessian-vector product) is not supported by the kernel backends. "
    "Use backend=\"reference\" (plain PyTorch autograd) for higher-order gradients.")


def first_order_only(grads: tuple, what: str) -> tuple:
    """The gradients a kernel's backward returns, made to raise on a backward through them.

    A backward runs with grad mode on only under create_graph=True. Gradients computed from
    saved kernel outputs have no graph back to the inputs, so a second-order derivative
    through them would silently come out as 0 (or the gradient would not require grad at
    all). Like torch.autograd.function.once_differentiable, but always (even when no
    incoming gradient requires grad) and with a message that names the way out."""
    if not torch.is_grad_enabled():
        return grads
    err = torch._C._functions.DelayedError(HIGHER_ORDER_MESSAGE.format(what=what), len(grads))

    def alias(t):
        if t is None:
            return None
        t = t.detach()
        t.requires_grad_(True)
        return t

    out = err(*[alias(t) for t in grads])
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _policy_loss_fake_impl(logp):
    """Shapes of (loss [], metrics [6], grad [B, T], row_scale [B]); fp32 (fp64 for fp64)."""
    acc = torch.float64 if logp.dtype == torch.float64 else torch.float32
    return (logp.new_empty((), dtype=acc), logp.new_empty((6,), dtype=acc),
            logp.new_empty(logp.shape, dtype=acc), logp.new_empty(logp.shape[:1], dtype=acc))


def _policy_loss_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[2], output[3])
    # Only the loss is differentiated: no zero-filled [B, T] grads for the other outputs.
    ctx.set_materialize_grads(False)
    ctx.logp_dtype = inputs[0].dtype


def _policy_loss_backward(ctx, grad_loss, *_unused):
    """d(loss)/d(logp) = grad_loss * row_scale[i] * grad[i, t]: the forward saved the rest.
    Only logp gets a gradient (old_logp, advantages, ref_logp are data). First order only:
    under create_graph=True the gradient raises when differentiated (first_order_only)."""
    grad, row_scale = ctx.saved_tensors
    dlogp = None
    if grad_loss is not None:
        with torch.no_grad():
            dlogp = (grad * (row_scale * grad_loss)[:, None]).to(ctx.logp_dtype)
    (dlogp,) = first_order_only((dlogp,), "the policy_loss kernel (backend cpu / cuda / triton)")
    return (dlogp,) + (None,) * 17  # old_logp .. kl_clamp: data and options


if HAS_C:
    @torch.library.register_fake("mars::policy_loss")
    def _policy_loss_fake(logp, old_logp, advantages, mask, ref_logp, is_weights, clip_low,
                          clip_high, dual_clip, kl_coef, kl_type, agg, num_tokens, num_seqs,
                          loss_scale, seq_ratio, log_ratio_clamp, kl_clamp=KL_CLAMP):
        return _policy_loss_fake_impl(logp)

    torch.library.register_autograd("mars::policy_loss", _policy_loss_backward,
                                    setup_context=_policy_loss_setup_context)


if HAS_TRITON:
    @torch.library.custom_op("mars::policy_loss_triton", mutates_args=())
    def policy_loss_triton(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                           mask: torch.Tensor, ref_logp: torch.Tensor | None,
                           is_weights: torch.Tensor | None, clip_low: float,
                           clip_high: float, dual_clip: float, kl_coef: float, kl_type: int,
                           agg: int, num_tokens: float, num_seqs: float, loss_scale: float,
                           seq_ratio: bool, log_ratio_clamp: float, kl_clamp: float = 10.0
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        from mars_kernels.policy_loss import policy_loss
        return policy_loss(logp, old_logp, advantages, mask, ref_logp, is_weights, clip_low,
                           clip_high, dual_clip, kl_coef, kl_type, agg, num_tokens, num_seqs,
                           loss_scale, seq_ratio, log_ratio_clamp, kl_clamp)

    @policy_loss_triton.register_fake
    def _policy_loss_triton_fake(logp, old_logp, advantages, mask, ref_logp, is_weights,
                                 clip_low, clip_high, dual_clip, kl_coef, kl_type, agg,
                                 num_tokens, num_seqs, loss_scale, seq_ratio, log_ratio_clamp,
                                 kl_clamp=KL_CLAMP):
        return _policy_loss_fake_impl(logp)

    @torch.library.custom_op("mars::policy_loss_triton_backward", mutates_args=())
    def policy_loss_triton_backward(grad: torch.Tensor, row_scale: torch.Tensor,
                                    grad_loss: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """grad * (row_scale * grad_loss)[:, None] in `dtype`: one Triton kernel, grad_loss
        read on the device (mars_kernels.policy_loss.policy_loss_backward)."""
        from mars_kernels.policy_loss import policy_loss_backward
        return policy_loss_backward(grad, row_scale, grad_loss, dtype)

    @policy_loss_triton_backward.register_fake
    def _policy_loss_triton_backward_fake(grad, row_scale, grad_loss, dtype):
        return grad.new_empty(grad.shape, dtype=dtype)

    def _policy_loss_triton_backward(ctx, grad_loss, *_unused):
        """_policy_loss_backward in one kernel launch (no separate multiply and cast)."""
        grad, row_scale = ctx.saved_tensors
        dlogp = None
        if grad_loss is not None:
            with torch.no_grad():
                dlogp = torch.ops.mars.policy_loss_triton_backward(grad, row_scale, grad_loss,
                                                                   ctx.logp_dtype)
        (dlogp,) = first_order_only((dlogp,), "the policy_loss kernel (backend triton)")
        return (dlogp,) + (None,) * 17  # old_logp .. kl_clamp: data and options

    torch.library.register_autograd("mars::policy_loss_triton", _policy_loss_triton_backward,
                                    setup_context=_policy_loss_setup_context)
