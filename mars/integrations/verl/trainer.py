"""The MARS recipe's trainer: verl 0.9.1's legacy ``RayPPOTrainer`` plus the anchors.

Why the legacy trainer: ``trainer.use_v1=true`` (verl's default) runs the TransferQueue
trainers (verl/trainer/ppo/v1/), whose ``_compute_advantage`` fetches a fixed list of
fields (uid, response_mask, rm_scores, ...) and never ``reward_baselines``
(v1/trainer_base.py L1743-1786); the legacy ``compute_advantage`` passes it to a registered
estimator (ray_trainer.py L257-259). ``RayPPOTrainer`` is marked deprecated in 0.9.1
(ray_trainer.py L285) but ships and runs; verl's DAPO recipe subclasses it the same way.

What this subclass changes, and nothing else of ``fit``:

- ``init_workers``: wraps ``self.async_rollout_manager`` in
  :class:`mars.integrations.verl.rollout.MonoAnchorRollout` (the anchors are generated in
  ``fit``'s own ``generate_sequences`` call and handed over as ``reward_baselines``).
- ``_compute_reward_colocate``: with a colocated reward model (no ``rm_scores`` from the
  agent loop), also scores the pending mono outputs with the same reward manager.
- ``_update_actor``: adds the step's ``mars/*`` anchor metrics to the actor's output
  metrics, which ``fit`` merges into the step's metrics (ray_trainer.py L1718-1719). It
  runs after the rewards in every reward mode of 0.9.1 (scored in the agent loop, or by a
  colocated reward model in ``_compute_reward_colocate``, L1563-1565, which comes after
  ``_balance_batch``, L1550) and whatever ``trainer.balance_batch`` is. Steps that do not
  update the actor (``trainer.critic_warmup``) log no ``mars/*`` metrics.
"""

from __future__ import annotations

import warnings

from verl.trainer.ppo.ray_trainer import RayPPOTrainer

from mars.integrations.verl.options import mars_options
from mars.integrations.verl.rollout import MonoAnchorRollout

__all__ = ["RayMARSTrainer"]

class RayMARSTrainer(RayPPOTrainer):
    """``RayPPOTrainer`` whose rollouts also produce the greedy mono-source anchors.

    Same constructor as ``RayPPOTrainer``; the ``mars`` config section (see
    :func:`mars_options`) selects the mono input and can turn the anchors off.
    """

    def __init__(self, config, *args, **kwargs):
        self.mars_opts = mars_options(config)
        estimator = str(config.algorithm.adv_estimator)
        if self.mars_opts["anchors"] and estimator != "mars":
            warnings.warn(f"algorithm.adv_estimator={estimator}: the recipe generates mono anchors "
                          "that only the 'mars' estimator reads (set mars.anchors=false for plain "
                          "GRPO without the extra generations)", UserWarning, stacklevel=2)
        if estimator == "remax":
            raise ValueError("the MARS recipe cannot run REMAX: both use __do_sample__ and "
                             "reward_baselines")
        super().__init__(config, *args, **kwargs)

    def init_workers(self):
        super().init_workers()
        self.async_rollout_manager = MonoAnchorRollout(
            self.async_rollout_manager,
            num_workers=int(self.config.actor_rollout_ref.rollout.agent.num_workers),
            mono_mode=self.mars_opts["mono_mode"],
            min_sources=int(self.mars_opts["min_sources"]),
            enable=bool(self.mars_opts["anchors"]),
        )

    def _compute_reward_colocate(self, batch):
        result = super()._compute_reward_colocate(batch)
        rollout = self.async_rollout_manager
        if isinstance(rollout, MonoAnchorRollout) and rollout.pending is not None:
            rollout.finish_pending(super()._compute_reward_colocate, batch, result)
        return result

    def _update_actor(self, batch):
        out = super()._update_actor(batch)
        rollout = self.async_rollout_manager
        if isinstance(rollout, MonoAnchorRollout):
            # fit: metrics.update(reduce_metrics(actor_output.meta_info["metrics"]))
            out.meta_info.setdefault("metrics", {}).update(
                {k: [v] for k, v in rollout.pop_metrics().items()})
        return out
