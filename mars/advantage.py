"""``mars.advantage`` is ``mars.ops.advantage`` (docs/layers.md): this file puts that module in its
place in ``sys.modules``, so ``import mars.advantage``, its attributes and patching them reach the
one module."""
import sys

from .ops import advantage as _module

sys.modules[__name__] = _module
