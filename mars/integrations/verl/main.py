"""``python -m mars.integrations.verl.main [hydra overrides]``: MARS on verl 0.9.1.

verl's recipe pattern (its DAPO recipe): a hydra entry point whose config extends verl's
``ppo_trainer`` (config/mars_trainer.yaml here; verl's config directory is on the search
path as ``pkg://verl.trainer.config``), a task runner that builds the trainer, and
``verl.trainer.main_ppo.run_ppo`` to start Ray. Sets ``algorithm.adv_estimator=mars``,
``actor_rollout_ref.actor.policy_loss.loss_mode=mars`` and ``trainer.use_v1=false`` (the
legacy trainer: the v1 trainers never pass ``reward_baselines``; docs/verl.md). Example::

    python -m mars.integrations.verl.main \\
        data.train_files=train.parquet data.val_files=val.parquet \\
        actor_rollout_ref.model.path=Qwen/Qwen2.5-VL-3B-Instruct \\
        actor_rollout_ref.rollout.name=vllm actor_rollout_ref.rollout.n=14

``--cfg job`` prints the composed config without starting anything.
"""

from __future__ import annotations

import os
import socket

import hydra

__all__ = ["main", "MarsTaskRunner", "apply_mars_defaults"]


def apply_mars_defaults(config) -> None:
    """Fill verl's reward function with mars's (``mars.rewards.verl_compat.compute_score``)
    when ``mars.use_mars_rewards`` is true and no ``reward.custom_reward_function.path`` is
    set; an explicit path is kept."""
    from omegaconf import open_dict

    section = config.get("mars", None)
    if section is None or not section.get("use_mars_rewards", True):
        return
    crf = config.reward.custom_reward_function
    if crf.get("path") in (None, ""):
        import mars.rewards.verl_compat as compat

        with open_dict(config):
            crf.path = os.path.abspath(compat.__file__)
            crf.name = "compute_score"


class MarsTaskRunner:
    """verl's ``main_ppo_v0.TaskRunner.run`` (verl/trainer/main_ppo_v0.py L151-222) with
    :class:`mars.integrations.verl.trainer.RayMARSTrainer` in place of ``RayPPOTrainer``.
    Wrapped in ``ray.remote`` by :func:`main`."""

    def __init__(self):
        from verl.trainer.main_ppo_v0 import BaseTaskRunner

        self._base = BaseTaskRunner()

    def run(self, config):
        from pprint import pprint

        from omegaconf import OmegaConf
        from verl.trainer.ppo.utils import (create_rl_dataset, create_rl_sampler, need_critic,
                                            need_reference_policy)
        from verl.utils.config import omega_conf_to_dataclass, validate_config
        from verl.utils.dataset.rl_dataset import collate_fn
        from verl.workers.config import HFModelConfig

        import mars.integrations.verl.plugin  # noqa: F401  (registers 'mars' in this process)
        from mars.integrations.verl.trainer import RayMARSTrainer

        base = self._base
        print(f"MarsTaskRunner hostname: {socket.gethostname()}, PID: {os.getpid()}")
        pprint(OmegaConf.to_container(config, resolve=True))
        OmegaConf.resolve(config)

        actor_rollout_cls, ray_worker_group_cls = base.add_actor_rollout_worker(config)
        base.add_critic_worker(config)
        base.add_reward_model_resource_pool(config)
        base.add_teacher_model_resource_pool(config)
        base.add_ref_policy_worker(config, actor_rollout_cls)
        validate_config(config=config, use_reference_policy=need_reference_policy(config),
                        use_critic=need_critic(config))

        model_config: HFModelConfig = omega_conf_to_dataclass(config.actor_rollout_ref.model)
        tokenizer, processor = model_config.tokenizer, model_config.processor
        resource_pool_manager = base.init_resource_pool_mgr(config)
        train_dataset = create_rl_dataset(config.data.train_files, config.data, tokenizer, processor,
                                          is_train=True,
                                          max_samples=config.data.get("train_max_samples", -1))
        val_dataset = create_rl_dataset(config.data.val_files, config.data, tokenizer, processor,
                                        is_train=False,
                                        max_samples=config.data.get("val_max_samples", -1))
        train_sampler = create_rl_sampler(config.data, train_dataset)

        trainer = RayMARSTrainer(
            config=config, tokenizer=tokenizer, processor=processor,
            role_worker_mapping=base.role_worker_mapping,
            resource_pool_manager=resource_pool_manager,
            ray_worker_group_cls=ray_worker_group_cls,
            train_dataset=train_dataset, val_dataset=val_dataset,
            collate_fn=collate_fn, train_sampler=train_sampler)
        trainer.init_workers()
        trainer.fit()


@hydra.main(config_path="config", config_name="mars_trainer", version_base=None)
def main(config):
    """Hydra entry point: validate, then run :class:`MarsTaskRunner` on Ray.

    Raises ValueError for ``trainer.use_v1=true`` (before importing verl's trainers)."""
    if config.trainer.get("use_v1", False):
        raise ValueError("trainer.use_v1=true: the v1 trainers do not pass reward_baselines to the "
                         "advantage estimator; the MARS recipe runs verl's legacy trainer "
                         "(trainer.use_v1=false, the recipe's default)")
    import ray
    from verl.trainer.main_ppo import run_ppo
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config
    from verl.utils.device import auto_set_device

    import mars.integrations.verl.plugin  # noqa: F401

    apply_mars_defaults(config)
    auto_set_device(config)
    validate_config(config=config, use_reference_policy=need_reference_policy(config),
                    use_critic=need_critic(config))
    # by its package name, so that Ray workers import it instead of unpickling a __main__ class
    from mars.integrations.verl.main import MarsTaskRunner as runner

    run_ppo(config, task_runner_class=ray.remote(num_cpus=1)(runner))


if __name__ == "__main__":
    main()
