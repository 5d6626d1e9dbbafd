"""TRL 1.16's own GRPOTrainer._compute_loss (trl/trainer/grpo_trainer.py), run on a stub
trainer whose model returns `logp` as the per-token log-probs: the peer numbers the loss
tests compare with."""

import types
from collections import defaultdict

import torch


def trl_compute_loss(loss_type, logp, old, adv, mask, ref, *, beta, eps_low=0.2, eps_high=0.28,
                     level="token", is_ratio=None, bias_correction_kl=False,
                     max_completion_length=None, num_items_in_batch=None):
    """(loss, TRL's train metrics). is_ratio: vLLM importance sampling on, the ratio in
    inputs["importance_sampling_ratio"]; bias_correction_kl: TRL's use_bias_correction_kl."""
    from trl.trainer.grpo_trainer import GRPOTrainer
    acc = types.SimpleNamespace(num_processes=1, sync_gradients=True,
                                reduce=lambda x, reduction="sum": x, gather=lambda x: x,
                                gather_for_metrics=lambda x: x)
    stub = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level=level, beta=beta, loss_type=loss_type, epsilon_low=eps_low,
        epsilon_high=eps_high, use_vllm=is_ratio is not None,
        vllm_importance_sampling_correction=is_ratio is not None,
        model=types.SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        max_completion_length=max_completion_length, accelerator=acc,
        _metrics=defaultdict(lambda: defaultdict(list)), _entropy_bonus_enabled=False,
        args=types.SimpleNamespace(use_bias_correction_kl=bias_correction_kl, delta=None,
                                   steps_per_generation=1))
    B = logp.shape[0]
    inputs = dict(prompt_ids=torch.zeros(B, 1, dtype=torch.long),
                  prompt_mask=torch.ones(B, 1, dtype=torch.long),
                  completion_ids=torch.zeros(logp.shape, dtype=torch.long),
                  completion_mask=mask.long(), advantages=adv, old_per_token_logps=old,
                  ref_per_token_logps=ref)
    if is_ratio is not None:
        inputs["importance_sampling_ratio"] = is_ratio
    if num_items_in_batch is not None:
        inputs["num_items_in_batch"] = torch.tensor(float(num_items_in_batch))
    return GRPOTrainer._compute_loss(stub, None, inputs), stub._metrics["train"]
