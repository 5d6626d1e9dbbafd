"""``mars._ext`` is ``mars.ops._ext`` (docs/layers.md): this file puts that module in its
place in ``sys.modules``, so ``import mars._ext``, its attributes and patching them reach the
one module."""
import sys

from .ops import _ext as _module

sys.modules[__name__] = _module
