"""The readable PyTorch specification of every mars op (SPEC sections 2-4).

Each kernel backend cites the function here that it must match. Computation is in
float64; outputs are float32 like the kernels'. Speed is not a goal of this file.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .groups import check_options, prepare


class AdvantageOutput(NamedTuple):
    """advantages [B] f32; per group g (labels in sorted order): mean [G], std [G] f32 of the
    pool (rollouts + anchors; std 0 for a pool of one), count [G] i64 (pool size N),
    gain [G] f32 = mean(rollout rewards) - mean(anchor rewards) (NaN where a group has no
    anchor); group_index [B] i64: each row's group."""
    advantages: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    count: torch.Tensor
    gain: torch.Tensor
    group_index: torch.Tensor


def advantage_dense(rewards, group_index, anchor_rewards, anchor_index, num_groups: int,
                    norm_by_std: bool, eps: float, unbiased: bool, singleton_raw: bool):
    """SPEC section 2 on dense group indices (each group has >= 1 rollout).

    Pool S_g = rollouts + anchors of group g, N = |S_g|:
        mu = mean(S_g);  sigma = sqrt(sum (s - mu)^2 / (N - 1))  (or / N if not unbiased)
        A_i = (r_i - mu) / (sigma + eps)     or  r_i - mu  when not norm_by_std
        N == 1: A_i = r_i if singleton_raw else 0
    Values are shifted by each group's first rollout before summing, so a group of
    identical values gives exactly 0. Returns (advantages, mean, std, count, gain).
    """
    B, G = rewards.numel(), num_groups
    r, m = rewards.double(), anchor_rewards.double()
    gi, ai = group_index, anchor_index
    zeros = r.new_zeros(G)
    first_row = torch.full((G,), B, dtype=torch.long, device=r.device).scatter_reduce(
        0, gi, torch.arange(B, device=r.device), reduce="amin")
    shift = r[first_row]
    dr, da = r - shift[gi], m - shift[ai]
    n_r = torch.bincount(gi, minlength=G).double()
    n_a = torch.bincount(ai, minlength=G).double()
    n = n_r + n_a
    s_r, s_a = zeros.index_add(0, gi, dr), zeros.index_add(0, ai, da)
    mu = (s_r + s_a) / n                                             # pass 1: mean
    ss = zeros.index_add(0, gi, (dr - mu[gi]) ** 2).index_add(0, ai, (da - mu[ai]) ** 2)
    sigma = torch.where(n > 1, (ss / (n - 1 if unbiased else n)).sqrt(), 0.0)  # pass 2
    centred = dr - mu[gi]
    adv = centred / (sigma[gi] + eps) if norm_by_std else centred
    single = r if singleton_raw else torch.zeros_like(r)
    adv = torch.where(n[gi] == 1, single, adv)
    gain = torch.where(n_a > 0, s_r / n_r - s_a / n_a.clamp(min=1), float("nan"))
    return (adv.float(), (shift + mu).float(), sigma.float(), n.long(), gain.float())


def mono_anchored_advantage(rewards, group_ids, anchor_rewards=None, anchor_group_ids=None, *,
                            norm_by_std=True, eps=1e-6, unbiased=True, singleton="zero",
                            backend="reference", return_stats=False):
    """Reference of `mars.mono_anchored_advantage` (same signature; `backend` is ignored).

    rewards [B] float, group_ids [B] labels (int tensor, or list / numpy array of str or
    int), anchor_rewards [K] float and anchor_group_ids [K] labels of the same kind.
    Returns [B] float32 advantages, or an AdvantageOutput with return_stats=True.
    """
    singleton_raw = check_options(singleton, eps)
    rewards, anchor_rewards, groups = prepare(rewards, group_ids, anchor_rewards, anchor_group_ids)
    out = advantage_dense(rewards, groups.index, anchor_rewards, groups.anchor_index,
                          groups.num_groups, norm_by_std, eps, unbiased, singleton_raw)
    return AdvantageOutput(*out, groups.index) if return_stats else out[0]
