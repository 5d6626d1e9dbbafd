"""verl's reward-function signature over the registry.

verl calls ``compute_score(data_source, solution_str, ground_truth, extra_info)`` (set
``custom_reward_function.path`` to this file and ``custom_reward_function.name`` to
``compute_score``). The reward is chosen by ``extra_info["reward"]`` or
``extra_info["task"]`` when present, else inferred from ``data_source`` / the ground
truth (:func:`mars.data.infer_task`).

Any completion string gives a finite float in the reward's range, in time linear in its
length; a malformed ground truth raises ValueError (verl reports it). See
docs/rewards.md, "What raises and what does not".
"""

from __future__ import annotations

from typing import Any

__all__ = ["compute_score"]


def compute_score(data_source: str, solution_str: str, ground_truth: Any, extra_info: dict | None = None) -> float:
    """The registered reward for this sample, as a float."""
    from mars.data.tasks import infer_task
    from mars.rewards.registry import get_reward

    info = extra_info if isinstance(extra_info, dict) else {}
    name = info.get("reward") or info.get("task") or infer_task(data_source, ground_truth)
    return get_reward(name)(solution_str, ground_truth)
