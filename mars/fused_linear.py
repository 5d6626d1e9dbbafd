"""``mars.fused_linear`` is ``mars.ops.fused_linear`` (docs/layers.md): this file puts that module in its
place in ``sys.modules``, so ``import mars.fused_linear``, its attributes and patching them reach the
one module."""
import sys

from .ops import fused_linear as _module

sys.modules[__name__] = _module
