"""verl advantage estimator ``mars``: GRPO's group z-score over the pooled multi-source
rewards and the prompt's mono-source anchors (docs/advantage.md, docs/verl.md).

verl 0.9.1 calls a registered estimator from ``ray_trainer.compute_advantage``
(verl/trainer/ppo/ray_trainer.py L249-281) as::

    fn(token_level_rewards=(bs, L), response_mask=(bs, L), config=<algorithm config>,
       index=non_tensor_batch["uid"],                  # when "uid" is present
       reward_baselines=batch["reward_baselines"])     # when present

and expects ``(advantages, returns)``, both (bs, L). The anchors travel as
``reward_baselines``: row i carries the mono rewards of *its own* prompt (uid), one column
per source, NaN where the prompt has fewer sources than the widest prompt of the batch.
Every row of a uid carries the same values, so verl's row re-ordering (``_balance_batch``)
and padding cannot move an anchor to another prompt: anchors are matched by uid, never by
position (the reference implementation matched anchors by the order groups first appear,
after verl had re-ordered the batch, so most prompts got another prompt's anchors;
docs/advantage.md, "Labels").

Multi-output agent sessions (verl's v1 trainers): ``compute_advantage_for_multi_trajectories``
(verl/trainer/ppo/v1/utils.py L148-220) groups a session's outputs (rows keyed
``{uid}_{session_id}_{index}``) as one group member only for GRPO and hands every other
estimator the whole batch, keys dropped. The keys reach no estimator, so this one reads
them from that caller's frame (:func:`_session_keys`) and does what verl does for GRPO:
the pool of a uid is the *final* output of each session (plus the uid's anchors), and every
output of a session gets its final output's advantage.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any, Optional

import numpy as np
import torch

__all__ = ["compute_mars_advantage", "anchors_from_baselines"]

_warned_no_anchors = False


def _warn_no_anchors():
    global _warned_no_anchors
    if not _warned_no_anchors:
        _warned_no_anchors = True
        warnings.warn(
            "adv_estimator=mars got no reward_baselines: no mono anchors, so these are plain "
            "GRPO advantages. verl's own trainers do not generate anchors; run the recipe "
            "`python -m mars.integrations.verl.main` (docs/verl.md). Warned once.",
            UserWarning, stacklevel=3)


def _cfg_get(config, key, default):
    if config is None:
        return default
    if hasattr(config, "get"):
        try:
            return config.get(key, default)
        except Exception:  # dataclass configs without .get semantics for unknown keys
            pass
    return getattr(config, key, default)


def _labels(index, n: int) -> np.ndarray:
    if index is None:
        raise ValueError(
            "the 'mars' advantage estimator needs the group labels: verl passes "
            "index=data.non_tensor_batch['uid'] only when the batch has a 'uid' key")
    if isinstance(index, torch.Tensor):
        index = index.detach().cpu().numpy()
    index = np.asarray(index)
    if index.ndim != 1 or len(index) != n:
        raise ValueError(f"index must be a 1-D array of {n} group labels (one per row), "
                         f"got shape {index.shape}")
    return index


def _session_keys(bs: int) -> Optional[list]:
    """The rows' ``{uid}_{session_id}_{index}`` keys when this estimator is called (through
    ``compute_advantage``) from verl's ``compute_advantage_for_multi_trajectories``, else
    None. Raises ValueError when that caller's keys do not match the rows."""
    frame = sys._getframe(1)
    for _ in range(8):  # estimator <- compute_advantage <- compute_advantage_for_multi_trajectories
        if frame is None:
            return None
        if (frame.f_code.co_name == "compute_advantage_for_multi_trajectories"
                and str(frame.f_globals.get("__name__", "")).startswith("verl.")):
            keys = frame.f_locals.get("batch_keys")
            if keys is None or len(keys) != bs:
                raise ValueError(
                    "adv_estimator=mars under verl's compute_advantage_for_multi_trajectories: "
                    f"expected one {{uid}}_{{session_id}}_{{index}} key per row ({bs} rows), got "
                    f"{None if keys is None else len(keys)}")
            return list(keys)
        frame = frame.f_back
    return None


def _final_outputs(keys: list) -> tuple[np.ndarray, np.ndarray]:
    """(final [S] row of each session, session [bs] position of each row's session in final),
    sessions in order of first appearance; the final output is the highest index (verl)."""
    best: dict[str, tuple[int, int]] = {}
    row_session = []
    for i, key in enumerate(keys):
        fields = str(key).rsplit("_", 2)
        if len(fields) != 3 or not fields[2].lstrip("-").isdigit():
            raise ValueError(f"multi-output batch key {key!r} is not {{uid}}_{{session_id}}_{{index}}")
        session, index = f"{fields[0]}_{fields[1]}", int(fields[2])
        row_session.append(session)
        if session not in best or best[session][0] < index:
            best[session] = (index, i)
    pos = {s: j for j, s in enumerate(best)}
    final = np.array([row for _, row in best.values()], dtype=np.int64)
    return final, np.array([pos[s] for s in row_session], dtype=np.int64)


def anchors_from_baselines(index, reward_baselines) -> tuple[torch.Tensor, np.ndarray]:
    """The anchors carried by ``reward_baselines``, one entry per (prompt, source).

    Args:
        index: [bs] group labels (verl's uid strings, numpy object array).
        reward_baselines: [bs, M] float (or [bs], one anchor per prompt): row i holds the
            mono rewards of row i's prompt; NaN marks a missing source. All rows of one
            label must hold the same values (NaN at the same places).

    Returns:
        (anchor_rewards [K] float32 on reward_baselines' device, anchor_labels [K] numpy
        array of index's kind), K = the non-NaN entries of one row per label.

    Raises:
        ValueError: wrong shape, rows of one label that disagree (naming the label),
        +-inf anchors (naming the label).
    """
    rb = reward_baselines
    if not isinstance(rb, torch.Tensor):
        raise ValueError(f"reward_baselines must be a tensor, got {type(rb).__name__}")
    index = _labels(index, rb.shape[0] if rb.dim() >= 1 else -1)
    if rb.dim() == 1:
        rb = rb[:, None]
    if rb.dim() != 2:
        raise ValueError(f"reward_baselines must be [bs] or [bs, M], got {tuple(rb.shape)}")
    if not rb.is_floating_point():
        raise ValueError(f"reward_baselines must be a float tensor (NaN = no anchor), got {rb.dtype}")
    if rb.shape[1] == 0 or len(index) == 0:
        return rb.new_zeros(0, dtype=torch.float32), index[:0]
    _, first, inverse = np.unique(index, return_index=True, return_inverse=True)
    first_t = torch.as_tensor(first, device=rb.device)
    inverse_t = torch.as_tensor(inverse.reshape(-1), device=rb.device)
    head = rb[first_t]                                   # [U, M], one row per label
    spread = head[inverse_t]                             # [bs, M], each row's label's row
    same = (rb == spread) | (torch.isnan(rb) & torch.isnan(spread))
    bad_rows = (~same.all(dim=1)).nonzero()
    if bad_rows.numel():
        i = int(bad_rows[0, 0])
        raise ValueError(
            f"reward_baselines: rows of uid {index[i]!r} carry different anchors "
            f"({rb[i].tolist()} vs {spread[i].tolist()}); each row must hold its own "
            "prompt's mono rewards (mars.integrations.verl.batch.reward_baselines_by_uid)")
    valid = ~torch.isnan(head)
    if torch.isinf(head[valid]).any():
        u = int(torch.isinf(head).any(dim=1).nonzero()[0, 0])
        raise ValueError(f"reward_baselines: infinite anchor reward for uid {index[first[u]]!r}")
    counts = valid.sum(dim=1).cpu().numpy()
    labels = np.repeat(index[first], counts)
    return head[valid].to(torch.float32), labels


def compute_mars_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Optional[np.ndarray] = None,
    reward_baselines: Optional[torch.Tensor] = None,
    config: Optional[Any] = None,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: Optional[bool] = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mono-anchored GRPO advantage in verl's estimator signature.

    Args:
        token_level_rewards: [bs, L] float; the outcome reward of row i is its sum over L.
        response_mask: [bs, L] 0/1 or bool.
        index: [bs] uid labels (verl's ``non_tensor_batch["uid"]``), required.
        reward_baselines: None (no anchors: exactly verl's GRPO; a UserWarning once per
            process says so, since verl's own trainers never produce anchors) or [bs, M] / [bs] float,
            each row its prompt's mono rewards, NaN for a missing source (see
            :func:`anchors_from_baselines`).
        config: verl's algorithm config; ``norm_adv_by_std_in_grpo`` (default True) is read
            from it (verl does not pass it to registered estimators).
        epsilon: added to the std (verl's 1e-6).
        norm_adv_by_std_in_grpo: overrides the config when given (False: Dr.GRPO, r - mu).
        kwargs: other keywords verl may pass (ignored).

    Returns:
        (advantages, returns), both [bs, L] in token_level_rewards' dtype: the per-row
        advantage times response_mask. The pool of a uid is its rows' rewards plus its
        anchors; sample std (N - 1). A uid with one row and no anchor gets verl's value
        (mean 0, std 1: r / (1 + eps), or r without the std). Called from verl's
        ``compute_advantage_for_multi_trajectories`` (v1 agent sessions), a session counts
        once, by its final output, whose advantage all its outputs get (verl's GRPO
        grouping; module docstring).

    Raises:
        ValueError naming the argument: missing index, wrong shapes, non-finite rewards,
        rows of one uid with different anchors.
    """
    import mars

    if not isinstance(token_level_rewards, torch.Tensor) or token_level_rewards.dim() != 2:
        raise ValueError("token_level_rewards must be a [bs, L] tensor, got "
                         f"{getattr(token_level_rewards, 'shape', type(token_level_rewards))}")
    if not isinstance(response_mask, torch.Tensor) or response_mask.shape != token_level_rewards.shape:
        raise ValueError(f"response_mask must be a tensor of token_level_rewards' shape "
                         f"{tuple(token_level_rewards.shape)}, got "
                         f"{getattr(response_mask, 'shape', type(response_mask))}")
    bs = token_level_rewards.shape[0]
    labels = _labels(index, bs)
    if norm_adv_by_std_in_grpo is None:
        norm_adv_by_std_in_grpo = bool(_cfg_get(config, "norm_adv_by_std_in_grpo", True))
    scores = token_level_rewards.detach().sum(dim=-1)
    if reward_baselines is not None:
        anchors, anchor_labels = anchors_from_baselines(labels, reward_baselines)
        anchors = anchors.to(scores.device)
    else:
        _warn_no_anchors()
        anchors, anchor_labels = None, None
    if bs == 0:
        out = token_level_rewards.new_zeros(token_level_rewards.shape)
        return out, out
    keys = _session_keys(bs)
    with torch.no_grad():
        if keys is not None:  # one pool member per session: its final output
            final, session = _final_outputs(keys)
            final_t = torch.as_tensor(final, device=scores.device)
            adv = _row_advantages(mars, scores[final_t], labels[final], anchors, anchor_labels,
                                  norm_adv_by_std_in_grpo, epsilon)
            # verl reads the final row's advantage at its first response token: 0 if none
            adv = adv * response_mask[final_t].detach().bool().any(dim=-1).to(adv.dtype)
            adv = adv[torch.as_tensor(session, device=scores.device)]
        else:
            adv = _row_advantages(mars, scores, labels, anchors, anchor_labels,
                                  norm_adv_by_std_in_grpo, epsilon)
        adv = adv.to(token_level_rewards.dtype).unsqueeze(-1) * response_mask
    return adv, adv


def _row_advantages(mars, scores, labels, anchors, anchor_labels, norm_by_std, epsilon):
    """[n] float32 advantages of n rows' scores [n] with labels [n] (verl's GRPO numbers
    without anchors)."""
    stats = mars.mono_anchored_advantage(
        scores, labels, anchors, anchor_labels, norm_by_std=bool(norm_by_std),
        eps=float(epsilon), unbiased=True, singleton="raw", return_stats=True)
    adv = stats.advantages
    # verl's GRPO gives a one-value pool mean 0 and std 1: r / (1 + eps) with the std.
    if norm_by_std:
        lone = stats.count[stats.group_index] == 1
        adv = torch.where(lone, scores.to(adv.dtype) / (1.0 + float(epsilon)), adv)
    return adv
