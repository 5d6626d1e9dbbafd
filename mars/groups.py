"""``mars.groups`` is ``mars.ops.groups`` (docs/layers.md): this file puts that module in its
place in ``sys.modules``, so ``import mars.groups``, its attributes and patching them reach the
one module."""
import sys

from .ops import groups as _module

sys.modules[__name__] = _module
