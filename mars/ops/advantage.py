"""`mars.mono_anchored_advantage`: validation, label factorisation, backend dispatch.

Every backend computes `mars.reference.advantage_dense` on the dense layout made here.
"""
from __future__ import annotations

import torch

from . import _ext, reference
from . import groups as _groups
from .backends import resolve
from .groups import check_options, prepare
from .reference import AdvantageOutput

_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_INTS = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.uint16,
         torch.uint32)
# The one-op CPU path (csrc/cpu/advantage.cpp), if the loaded extension has it.
_INT_LABELS_OP = _groups.has_cpu_op("mars::advantage_int_labels")


def _kernel(name: str):
    if name == "reference":
        return reference.advantage_dense
    if name == "triton":
        return torch.ops.mars.mono_anchored_advantage_triton
    return torch.ops.mars.mono_anchored_advantage  # "cpu" / "cuda": dispatched by device


def _dense_labels(device):
    """The C++ int-label factoriser for CPU tensors (one pass instead of ~15 torch ops)."""
    return torch.ops.mars.dense_labels if _ext.HAS_C and device.type == "cpu" else None


def _int_labels(t, n: int) -> bool:
    """A 1-D CPU int tensor of n labels that int64 holds exactly (uint64 excepted)."""
    return (type(t) is torch.Tensor and t.is_cpu and t.dim() == 1 and len(t) == n
            and t.dtype in _INTS)


def _one_op_cpu(rewards, group_ids, anchor_rewards, anchor_group_ids, backend, args):
    """The eager call on CPU tensors with int tensor labels, in one C++ op that factorises
    the labels and checks the values as mars.groups does. args: the op's options, ending
    with want_index. Returns the op's outputs, or None where the call is not of that kind
    or a check fails: the general path then decides (and raises, naming the rows and
    labels), so the errors stay the general path's."""
    if (not _INT_LABELS_OP or backend not in ("auto", "cpu") or _groups._FORCE_ONE_READ
            or type(rewards) is not torch.Tensor or not rewards.is_cpu
            or rewards.dim() != 1 or rewards.dtype not in _FLOATS
            or torch.compiler.is_compiling()):
        return None
    B = len(rewards)
    if not B or not _int_labels(group_ids, B):
        return None
    if anchor_rewards is None and anchor_group_ids is None:
        anchor_rewards, anchor_group_ids = rewards.new_zeros(0), group_ids.new_zeros(0)
    elif not (type(anchor_rewards) is torch.Tensor and anchor_rewards.is_cpu
              and anchor_rewards.dim() == 1 and anchor_rewards.dtype == rewards.dtype
              and _int_labels(anchor_group_ids, len(anchor_rewards))):
        return None
    ids = group_ids if group_ids.dtype == torch.int64 else group_ids.long()
    aids = anchor_group_ids if anchor_group_ids.dtype == torch.int64 else anchor_group_ids.long()
    out = torch.ops.mars.advantage_int_labels(
        rewards.detach() if rewards.requires_grad else rewards, ids,
        anchor_rewards.detach() if anchor_rewards.requires_grad else anchor_rewards, aids, *args)
    return None if out[8] else out


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
        singleton: a group whose pool has one value: "zero" (TRL: 0) or "raw" (the
            reward r; verl's GRPO gives r / (1 + eps) with norm_by_std, mean 0 and std 1,
            which the verl plug-in's estimator applies itself).
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
    args = (bool(norm_by_std), float(eps), bool(unbiased), singleton_raw)
    out = _one_op_cpu(rewards, group_ids, anchor_rewards, anchor_group_ids, backend,
                      args + (bool(return_stats),))
    if out is not None:
        return AdvantageOutput(*out[:6]) if return_stats else out[0]
    rewards, anchor_rewards, groups = prepare(rewards, group_ids, anchor_rewards,
                                              anchor_group_ids, _dense_labels)
    name = resolve(backend, rewards.device)
    if name == "triton":
        _ext.require_triton_cpu(rewards.device)
    out = _kernel(name)(rewards.detach(), groups.index, anchor_rewards.detach(),
                        groups.anchor_index, groups.num_groups, *args)
    return AdvantageOutput(*out, groups.index) if return_stats else out[0]
