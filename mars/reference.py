"""``mars.reference`` is ``mars.ops.reference`` (docs/layers.md): this file puts that module in its
place in ``sys.modules``, so ``import mars.reference``, its attributes and patching them reach the
one module."""
import sys

from .ops import reference as _module

sys.modules[__name__] = _module
