"""mars: mono-anchored advantage normalisation (MARS) kernels for multi-source RLVR.

The public names; docs/README.md indexes their documentation. `mars.loss`,
`mars.rewards`, `mars.data` and `mars.evaluate` load on first use.
"""
from . import reference
from .advantage import mono_anchored_advantage
from .backends import backends
from .reference import AdvantageOutput

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
