"""`mars.mono_anchored_advantage`: validation, label factorisation, backend dispatch.

Every backend computes `mars.reference.advantage_dense` on the dense layout made here.
"""
from __future__ import annotations

import torch

from . import _ext, reference
from .backends import resolve
from .groups import check_options, prepare
from .reference import AdvantageOutput


def _kernel(name: str):
    if name == "reference":
        return reference.advantage_dense
    if name == "triton":
        return torch.ops.mars.mono_anchored_advantage_triton
    return torch.ops.mars.mono_anchored_advantage  # "cpu" / "cuda": dispatched by device


def _dense_labels(device):
    """The C++ int-label factoriser for CPU tensors (one pass instead of ~15 torch ops)."""
    return torch.ops.mars.dense_labels if _ext.HAS_C and device.type == "cpu" else None


def mono_anchored_advantage(rewards, group_ids, anchor_rewards=None, anchor_group_ids=None, *,
                            norm_by_std=True, eps=1e-6, unbiased=True, singleton="zero",
                            backend="auto", return_stats=False):
    """Mono-anchored group advantage (docs/advantage.md); with no anchors, GRPO / Dr.GRPO.

    Args:
        rewards: [B] float (any float dtype, CPU or CUDA): rewards of the trained rollouts.
        group_ids: [B] group labels: int tensor, or list / tuple / numpy array of str or
            int, compared exactly (docs/advantage.md, "Labels"). Rows of a group may sit
            anywhere in the batch; groups may differ in size.
        anchor_rewards: [K] float mono-source rewards (any number per group, 0 included).
        anchor_group_ids: [K] labels of the same kind; each must occur in group_ids.
        norm_by_std: divide by (std + eps); False gives Dr.GRPO's r - mu.
        eps: added to the std (not a max). unbiased: sample std (N - 1) or population (N).
        singleton: a group whose pool has one value: "zero" (TRL) or "raw" (verl: reward).
        backend: "auto" | "reference" | "triton" | "cuda" | "cpu".
        return_stats: return an AdvantageOutput (advantages, mean, std, count, gain,
            group_index) instead of the [B] advantages.

    Returns:
        [B] float32 advantages on rewards' device (or AdvantageOutput). On a GPU with int
        tensor labels the call reads the host once (docs/advantage.md, "Host syncs").

    Raises:
        ValueError naming the argument: non-finite rewards (with the rows), anchor labels
        absent from group_ids, mixed label kinds, length or device mismatches, 2-D
        rewards, bad options; under torch.compile too.
    """
    singleton_raw = check_options(singleton, eps)
    rewards, anchor_rewards, groups = prepare(rewards, group_ids, anchor_rewards,
                                              anchor_group_ids, _dense_labels)
    name = resolve(backend, rewards.device)
    if name == "triton" and rewards.device.type == "cpu" and not _ext.triton_interpret():
        raise RuntimeError("backend 'triton' on CPU tensors needs TRITON_INTERPRET=1")
    out = _kernel(name)(rewards.detach(), groups.index, anchor_rewards.detach(),
                        groups.anchor_index, groups.num_groups, bool(norm_by_std), float(eps),
                        bool(unbiased), singleton_raw)
    return AdvantageOutput(*out, groups.index) if return_stats else out[0]
