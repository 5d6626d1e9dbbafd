"""``mars.loss`` is ``mars.ops.loss`` (docs/layers.md): this file puts that module in its
place in ``sys.modules``, so ``import mars.loss``, its attributes and patching them reach the
one module."""
import sys

from .ops import loss as _module

sys.modules[__name__] = _module
