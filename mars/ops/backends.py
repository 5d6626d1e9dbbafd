"""Which backend runs an op: `mars.backends()` and the "auto" resolution."""
from __future__ import annotations

import warnings
from typing import NamedTuple

import torch

from . import _ext

NAMES = ("reference", "cpu", "cuda", "triton")
_warned_fallback: set = set()


class Backend(NamedTuple):
    available: bool
    reason: str  # why it is missing, or what it runs on


def _cuda_built() -> tuple[bool, str]:
    """Whether the loaded extension holds CUDA kernels, and why not from the build record."""
    if not _ext.HAS_C:
        return False, _ext.C_ERROR
    if _ext.HAS_CUDA_KERNELS:
        return True, "CUDA kernels compiled"
    try:
        from .. import _build_info as info
        why = info.CUDA_SKIPPED_BECAUSE or "unknown"
    except ImportError:
        why = "no build record (mars/_build_info.py)"
    return False, f"CUDA kernels not compiled: {why}"


def backends() -> dict[str, Backend]:
    """Each backend of this install: available or not, and why.

    >>> mars.backends()["cuda"]
    Backend(available=False, reason='no GPU visible (torch.cuda.is_available() is False)')
    """
    gpu = torch.cuda.is_available()
    cuda_ok, cuda_why = _cuda_built()
    if cuda_ok and not gpu:
        cuda_ok, cuda_why = False, "CUDA kernels compiled, but no GPU visible " \
                                   "(torch.cuda.is_available() is False)"
    if not _ext.HAS_TRITON:
        triton = Backend(False, _ext.TRITON_ERROR)
    elif gpu:
        triton = Backend(True, "GPU")
    elif not _ext.triton_interpret():
        triton = Backend(False, "no GPU; set TRITON_INTERPRET=1 to run the Triton kernels on CPU")
    elif _ext.TRITON_INTERPRETER_ERROR:
        triton = Backend(False, f"no GPU, and {_ext.TRITON_INTERPRETER_ERROR}")
    else:
        triton = Backend(True, "CPU through the interpreter (TRITON_INTERPRET=1)")
    return {
        "reference": Backend(True, "plain PyTorch, any device"),
        "cpu": Backend(_ext.HAS_C, "C++ kernels" if _ext.HAS_C else _ext.C_ERROR),
        "cuda": Backend(cuda_ok, cuda_why),
        "triton": triton,
    }


def resolve(backend: str, device: torch.device) -> str:
    """The backend that will run on `device`; raises for an unknown or missing one."""
    if backend not in NAMES + ("auto",):
        raise ValueError(f"backend must be one of {('auto',) + NAMES}, got {backend!r}")
    table = backends()
    if backend == "auto":
        order = ("cuda", "triton", "reference") if device.type == "cuda" else ("cpu", "reference")
        name = next(b for b in order if table[b].available)
        if name == "reference":
            _warn_fallback(device, {b: table[b].reason for b in order[:-1]})
        return name
    if not table[backend].available:
        raise RuntimeError(f"backend {backend!r} is not available: {table[backend].reason}")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend 'cpu' needs CPU tensors, got tensors on {device}")
    if backend == "cuda" and device.type != "cuda":
        raise ValueError(f"backend 'cuda' needs CUDA tensors, got tensors on {device}")
    return backend


def _warn_fallback(device: torch.device, reasons: dict) -> None:
    """backend="auto" found no kernel for this device: say so once, with the reasons, since
    the float64 reference is correct but many times slower."""
    key = (device.type, tuple(reasons.values()))
    if key in _warned_fallback:
        return
    _warned_fallback.add(key)
    why = "; ".join(f"{b}: {r}" for b, r in reasons.items())
    warnings.warn(f"mars: backend='auto' runs the float64 reference on {device.type} tensors "
                  f"(slow) because no kernel backend is available ({why}). Pass "
                  "backend='reference' to silence this.", RuntimeWarning, stacklevel=3)
