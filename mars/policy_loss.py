"""``mars.policy_loss`` is ``mars.ops.policy_loss`` (docs/layers.md): this file puts that module in its
place in ``sys.modules``, so ``import mars.policy_loss``, its attributes and patching them reach the
one module."""
import sys

from .ops import policy_loss as _module

sys.modules[__name__] = _module
