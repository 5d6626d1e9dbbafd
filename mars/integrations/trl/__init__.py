"""mars for TRL (pinned to trl >=1.16.0,<1.17; ``pip install 'mars[trl]'``; docs/trl.md).

- ``MarsGRPOTrainer`` (``trainer``): ``trl.GRPOTrainer`` with mono-anchored advantages
  (greedy mono-source anchors generated on every rank, scored by the trainer's reward
  functions) and the ``mars.loss`` policy loss; with ``mono_sources=None`` it gives TRL's
  own GRPO numbers.
- ``mono``: the mono-source variants of a TRL dataset row (``mono_examples``).
- ``advantage``: TRL's advantage formula with anchors (``trl_advantages``).
- ``loss``: TRL's loss types as ``mars.loss`` options (``loss_plan``, ``loss_normalisers``).

Importing this package imports ``trl`` (for ``MarsGRPOTrainer``) lazily: ``mono``,
``advantage`` and ``loss`` need only torch.
"""

__all__ = ["MarsGRPOTrainer", "mono_examples", "trl_advantages", "loss_plan", "loss_normalisers",
           "TESTED_TRL"]

from ._compat import TESTED_TRL
from .advantage import trl_advantages
from .loss import loss_normalisers, loss_plan
from .mono import mono_examples


def __getattr__(name):
    if name == "MarsGRPOTrainer":
        from .trainer import MarsGRPOTrainer
        return MarsGRPOTrainer
    raise AttributeError(f"module 'mars.integrations.trl' has no attribute {name!r}")
