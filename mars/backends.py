"""``mars.backends`` is ``mars.ops.backends`` (docs/layers.md): this file puts that module in its
place in ``sys.modules``, so ``import mars.backends``, its attributes and patching them reach the
one module."""
import sys

from .ops import backends as _module

sys.modules[__name__] = _module
