"""TRL 1.16's GRPO advantages (``multi_objective_aggregation="sum_then_normalize"``) with
`mars.mono_anchored_advantage`, optionally with mono-source anchors (docs/trl.md).

TRL (``GRPOTrainer._generate_and_score_completions``, trl/trainer/grpo_trainer.py
L2754-2810 in 1.16.0): rewards = nansum_f(w_f r_f) per completion, NaN where every reward
function returned None (unscorable); groups are ``num_generations`` consecutive rows of the
gathered batch; nan-aware group mean and sample std (``trl.trainer.utils.nanstd``);
``(r - mean) / (std + 1e-4)`` for scale_rewards="group", the batch's std for "batch", no
division for "none"; NaN advantages (unscorable rows) become 0.

`trl_advantages` computes the same numbers: without anchors they equal TRL's (float64
statistics instead of float32, within 1e-6); with anchors the pool of a group is its
scorable rewards plus its scorable anchors (docs/advantage.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import mars

__all__ = ["TRL_ADVANTAGE_EPS", "SCALE_REWARDS", "TRLAdvantages", "trl_rewards", "trl_advantages"]

TRL_ADVANTAGE_EPS = 1e-4  # TRL: advantages / (std_rewards + 1e-4)
SCALE_REWARDS = ("group", "batch", "none")


@dataclass
class TRLAdvantages:
    """advantages [B] float32 (0 for unscorable rows); per group g = row // G (all groups
    0..B/G-1): gain [B/G] (mean(r) - mean(m) over scorable values, NaN without anchors or
    without scorable rewards), pooled_std [B/G] (std of the pool, 0 for a pool of one, NaN
    for a group without scorable rewards), num_anchors [B/G] (scorable anchors used)."""

    advantages: torch.Tensor
    gain: torch.Tensor
    pooled_std: torch.Tensor
    num_anchors: torch.Tensor


def trl_rewards(rewards_per_func: torch.Tensor, reward_weights: torch.Tensor) -> torch.Tensor:
    """[N, F] rewards per function (NaN: the function returned None) -> [N] TRL rewards:
    weighted nansum over the functions, NaN where every function returned None."""
    if rewards_per_func.dim() != 2:
        raise ValueError(f"rewards_per_func must be [N, F], got shape {tuple(rewards_per_func.shape)}")
    w = reward_weights.to(rewards_per_func.device, rewards_per_func.dtype)
    rewards = (rewards_per_func * w.unsqueeze(0)).nansum(dim=1)
    rewards[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan
    return rewards


def _sample_std(x: torch.Tensor) -> torch.Tensor:
    """nanstd of finite values as TRL: NaN for fewer than 2 values."""
    if x.numel() < 2:
        return torch.tensor(float("nan"), dtype=torch.float64, device=x.device)
    return x.double().std(unbiased=True)


def trl_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group",
                   anchor_rewards: torch.Tensor | None = None,
                   anchor_groups: torch.Tensor | None = None) -> TRLAdvantages:
    """GRPO advantages of TRL 1.16 (see the module docstring), with optional anchors.

    Args:
        rewards: [B] float, B a multiple of num_generations; NaN marks an unscorable row
            (it leaves the statistics and gets advantage 0); +-inf raises.
        num_generations: G, rows per group (consecutive).
        scale_rewards: "group" (std of the group's pool), "batch" (std of every scorable
            reward and anchor of the batch, the numerator still centred on the group's
            pool mean) or "none" (r - pool mean).
        anchor_rewards: [K] float mono-source rewards (NaN: unscorable, dropped).
        anchor_groups: [K] int group index (0 <= g < B / G) of each anchor.

    Returns:
        TRLAdvantages.

    Raises:
        ValueError: a bad scale_rewards or num_generations, B not a multiple of G,
        mismatched anchor shapes, an anchor group out of range, infinite rewards.
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    if isinstance(num_generations, bool) or not isinstance(num_generations, int) or num_generations < 1:
        raise ValueError(f"num_generations must be an int >= 1, got {num_generations!r}")
    if rewards.dim() != 1 or rewards.numel() % num_generations:
        raise ValueError(f"rewards must be [B] with B a multiple of num_generations={num_generations}, "
                         f"got shape {tuple(rewards.shape)}")
    if torch.isinf(rewards).any():
        raise ValueError(f"rewards must be finite or NaN (unscorable), got inf at rows "
                         f"{torch.isinf(rewards).nonzero().flatten().tolist()}")
    device = rewards.device
    B, G = rewards.numel(), num_generations
    n_groups = B // G
    groups = torch.arange(B, device=device) // G
    if anchor_rewards is None:
        anchor_rewards = rewards.new_zeros(0)
        anchor_groups = torch.zeros(0, dtype=torch.long, device=device)
    anchor_rewards = anchor_rewards.to(device)
    anchor_groups = anchor_groups.to(device=device, dtype=torch.long)
    if anchor_rewards.shape != anchor_groups.shape or anchor_rewards.dim() != 1:
        raise ValueError(f"anchor_rewards and anchor_groups must both be [K], got "
                         f"{tuple(anchor_rewards.shape)} and {tuple(anchor_groups.shape)}")
    if anchor_groups.numel() and (anchor_groups.min() < 0 or anchor_groups.max() >= n_groups):
        raise ValueError(f"anchor_groups must lie in [0, {n_groups}), got {anchor_groups.tolist()}")
    if torch.isinf(anchor_rewards).any():
        raise ValueError("anchor_rewards must be finite or NaN (unscorable)")

    ok = ~torch.isnan(rewards)
    has_reward = torch.zeros(n_groups, dtype=torch.bool, device=device)
    has_reward[groups[ok]] = True
    ok_a = ~torch.isnan(anchor_rewards) & has_reward[anchor_groups]

    advantages = torch.zeros(B, dtype=torch.float32, device=device)
    gain = torch.full((n_groups,), float("nan"), dtype=torch.float32, device=device)
    pooled_std = torch.full((n_groups,), float("nan"), dtype=torch.float32, device=device)
    num_anchors = torch.zeros(n_groups, dtype=torch.long, device=device)
    num_anchors.index_add_(0, anchor_groups[ok_a], torch.ones_like(anchor_groups[ok_a]))
    if not ok.any():
        return TRLAdvantages(advantages, gain, pooled_std, num_anchors)
    out = mars.mono_anchored_advantage(
        rewards[ok], groups[ok], anchor_rewards[ok_a], anchor_groups[ok_a],
        norm_by_std=scale_rewards == "group", eps=TRL_ADVANTAGE_EPS, unbiased=True,
        singleton="zero", return_stats=True)
    adv = out.advantages
    if scale_rewards == "batch":
        std = _sample_std(torch.cat([rewards[ok].double(), anchor_rewards[ok_a].double()]))
        adv = torch.nan_to_num(adv.double() / (std + TRL_ADVANTAGE_EPS), nan=0.0).float()
    advantages[ok] = adv.float()
    present = torch.unique(groups[ok])  # sorted: the order of out's per-group stats
    gain[present] = out.gain.float()
    pooled_std[present] = out.std.float()
    return TRLAdvantages(advantages, gain, pooled_std, num_anchors)
