"""TRL 1.16's GRPO loss types as `mars.loss` options (docs/trl.md, "TRL's numbers").

`GRPOTrainer._compute_loss` (trl/trainer/grpo_trainer.py L3020-3290 in 1.16.0) computes,
per token, ``-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)`` with r = exp(logp - old)
(no log-ratio clamp; GSPO's row-mean log-ratio for importance_sampling_level="sequence"),
multiplies it by the off-policy mask, the high-entropy mask and vLLM's importance-sampling
ratio, adds ``beta * k3`` (k3 = exp(ref - logp) - (ref - logp) - 1, unclamped:
``kl_clamp=None``; times r with use_bias_correction_kl, the default) and
aggregates with a normaliser that depends on the loss type:

=========  =========================================  ======================================
loss_type  TRL                                        mars.loss
=========  =========================================  ======================================
grpo       mean_i(sum_t l / max(L_i, 1)) / GA          seq-mean-token-mean, num_seqs = B GA
bnpo       sum l / max(sum L, 1) / GA                  token-mean, num_tokens = max(sum L, 1) GA
dr_grpo    sum l / (B max_completion_length) / GA      seq-mean-token-sum-norm, num_seqs = B GA,
                                                      loss_scale = max_completion_length
dapo       sum l / (max(n_items, 1) / P * GA / S)      token-mean, num_tokens = that normaliser
luspo      mean_i(sum_t l) / GA                        seq-mean-token-sum, num_seqs = B GA
=========  =========================================  ======================================

B counts every row of the micro-batch, empty ones included (masked truncated completions);
GA = current_gradient_accumulation_steps (1 in eval), n_items = inputs["num_items_in_batch"]
(the generation batch's loss tokens, all processes), P = processes, S =
steps_per_generation (dapo multiplies by GA / S in train mode only). cispo, sapo and vespo have
other per-token terms: `loss_plan` returns a reason and the trainer uses TRL's own loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from mars.reference import check_policy_loss_options

__all__ = ["LOSS_AGGS_BY_TYPE", "LossPlan", "loss_plan", "loss_normalisers"]

LOSS_AGGS_BY_TYPE = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean",
                     "dr_grpo": "seq-mean-token-sum-norm", "dapo": "token-mean",
                     "luspo": "seq-mean-token-sum"}


@dataclass
class LossPlan:
    """How the trainer computes its loss: ``options`` for `mars.loss.policy_loss` (without
    the normalisers), or ``fallback`` (why TRL's own `_compute_loss` is used instead)."""

    loss_type: str
    options: dict = field(default_factory=dict)
    fallback: str | None = None


def loss_plan(loss_type: str, *, epsilon_low: float, epsilon_high: float, beta: float,
              importance_sampling_level: str = "token", use_bias_correction_kl: bool = True,
              delta: float | None = None, entropy_bonus: bool = False,
              backend: str = "auto") -> LossPlan:
    """The `mars.loss` options that give TRL's loss for these GRPOConfig values.

    delta (TRL's two-sided clip, INTELLECT-2) caps the unclipped ratio at delta; for
    delta >= 1 + epsilon_high that is the dual clip ``dual_clip=delta`` (both give
    -A delta for A < 0 and r > delta, and leave A > 0 alone). A smaller delta, an entropy
    bonus (entropy_coef != 0 or adaptive), a loss type without a mars aggregation, or
    options outside mars.loss's ranges give a plan with ``fallback`` set."""
    agg = LOSS_AGGS_BY_TYPE.get(loss_type)
    if agg is None:
        return LossPlan(loss_type, fallback=f"loss_type={loss_type!r} is not a clipped-ratio loss of mars.loss "
                                            f"(mars covers {sorted(LOSS_AGGS_BY_TYPE)})")
    if entropy_bonus:
        return LossPlan(loss_type, fallback="the entropy bonus (entropy_coef != 0 or use_adaptive_entropy) is "
                                            "TRL's own term")
    dual_clip = None
    if delta is not None:
        if not delta >= 1 + epsilon_high:
            return LossPlan(loss_type, fallback=f"delta={delta} < 1 + epsilon_high={1 + epsilon_high} is not a "
                                                "dual clip")
        dual_clip = float(delta) if math.isfinite(delta) else None
    if importance_sampling_level not in ("token", "sequence"):
        return LossPlan(loss_type, fallback=f"importance_sampling_level={importance_sampling_level!r}")
    opts = dict(clip_low=float(epsilon_low), clip_high=float(epsilon_high), dual_clip=dual_clip,
                kl_coef=float(beta), kl_type="k3_ratio" if use_bias_correction_kl else "k3", agg=agg,
                ratio_level=importance_sampling_level, log_ratio_clamp=None, kl_clamp=None)
    try:
        check_policy_loss_options(**opts)
    except ValueError as e:
        return LossPlan(loss_type, fallback=f"mars.loss refuses these options: {e}")
    return LossPlan(loss_type, {**opts, "backend": backend})


def loss_normalisers(loss_type: str, mask: torch.Tensor, *, gradient_accumulation_steps: int,
                     train: bool = True, max_completion_length: int | None = None,
                     num_items_in_batch: torch.Tensor | float | None = None, num_processes: int = 1,
                     steps_per_generation: int = 1) -> dict:
    """``num_tokens`` / ``num_seqs`` / ``loss_scale`` for `mars.loss.policy_loss` that
    reproduce TRL's normaliser of ``loss_type`` (see the module table) on a micro-batch
    with loss mask ``mask`` [B, T]. Tensors stay on mask's device (no host sync here)."""
    ga = gradient_accumulation_steps if train else 1
    B = mask.shape[0]
    if loss_type in ("grpo", "luspo"):
        return {"num_seqs": B * ga}
    if loss_type == "dr_grpo":
        if not max_completion_length:
            raise ValueError("dr_grpo needs max_completion_length (TRL divides by B * max_completion_length)")
        return {"num_seqs": B * ga, "loss_scale": max_completion_length}
    if loss_type == "bnpo":
        return {"num_tokens": mask.sum().clamp(min=1.0).float() * ga}
    if loss_type == "dapo":
        if num_items_in_batch is None:
            raise ValueError("dapo needs inputs['num_items_in_batch'] (TRL's global token count)")
        n = torch.as_tensor(num_items_in_batch, device=mask.device).clamp(min=1.0).float() / num_processes
        if train:
            n = n * gradient_accumulation_steps / steps_per_generation
        return {"num_tokens": n}
    raise ValueError(f"no mars normaliser for loss_type={loss_type!r}")
