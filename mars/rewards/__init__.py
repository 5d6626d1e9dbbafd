"""Rewards of the paper's task families and a registry for your own.

    from mars.rewards import get_reward, register_reward
    get_reward("grounding")(completion, [[10, 20, 110, 220]])      # -> float
    get_reward("vqa").batch(completions, ground_truths, sample_ids)  # -> list[float]

    @register_reward("my_task")
    def my_reward(completion: str, ground_truth) -> float: ...

verl: ``mars.rewards.compute_score(data_source, solution_str, ground_truth, extra_info)``.

Built-in: "grounding" (max 0.75 + 1 + 0.3 ln n_gt), "vqa" and "mcq" (max 1.5). Any
completion string scores a finite reward in that range (a hedged answer, e.g. "yes or
no" or "A or B", earns no accuracy); only a malformed ground truth raises ValueError.
The rules: docs/rewards.md.
"""

from .registry import (
    RewardBreakdown,
    RewardFunction,
    RewardFunctionWarning,
    compute_rewards,
    get_reward,
    list_rewards,
    register_reward,
)
from .grounding import grounding_reward
from .vqa import mcq_reward, vqa_reward
from .metrics import sample_metric
from .verl_compat import compute_score

__all__ = [
    "RewardBreakdown",
    "RewardFunction",
    "RewardFunctionWarning",
    "compute_rewards",
    "get_reward",
    "list_rewards",
    "register_reward",
    "grounding_reward",
    "vqa_reward",
    "mcq_reward",
    "sample_metric",
    "compute_score",
]
