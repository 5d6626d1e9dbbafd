"""Trainer integrations of mars.

Each sub-package needs its trainer installed (the matching extra) and imports it on
import; ``import mars`` never imports any of them.

- ``mars.integrations.verl``: verl plug-in (``algorithm.adv_estimator=mars``,
  ``actor_rollout_ref.actor.policy_loss.loss_mode=mars``) and the mono-anchor recipe
  ``python -m mars.integrations.verl.main`` (``pip install 'mars[verl]'``; docs/verl.md).
- ``mars.integrations.trl``: TRL integration (``pip install 'mars[trl]'``).
"""
