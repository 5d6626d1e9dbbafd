"""VQA and multiple-choice rewards (SpatialQA, nuScenes, OCR-VQA); the full rules are in
docs/rewards.md ("VQA accuracy", "Multiple-choice accuracy", "Hedged answers").

reward = format + accuracy, where

* format (0 .. 0.5): 0.25 for one non-empty ``<think>``, 0.25 for one non-empty ``<answer>``;
* accuracy (0 or 1): judged on the first ``<answer>`` content only, never the reasoning.
  Missing or empty answer -> 0. ``vqa``: normalised exact match with "or"-alternatives and
  yes/no normalisation (:func:`mars.rewards.answers.answers_match`). ``mcq``: choice
  letters compared (:func:`mars.rewards.answers.choice_match`). A hedged answer, one that
  commits to more than one option ("yes or no", "A or B", "(A)(B)"), earns no accuracy;
  ``details["hedged"]`` says so.

Range: any completion string gives a finite reward in [0, 1.5]. Only a malformed ground
truth raises (ValueError). The ground truth may be plain or ``<answer>``-wrapped.
"""

from __future__ import annotations

from typing import Any

from .answers import judge_answer, normalize_answer
from .registry import RewardBreakdown, register_reward
from .tags import extract_answer, format_score, unwrap_answer

__all__ = ["vqa_reward", "mcq_reward", "answer_status"]

VQA_MAX_REWARD = 1.5


def _gt_text(ground_truth: Any) -> str:
    gt = unwrap_answer(ground_truth)
    if isinstance(gt, (list, tuple)) and len(gt) == 1:
        gt = gt[0]
    if isinstance(gt, bool) or not isinstance(gt, (str, int, float)):
        raise ValueError(f"VQA ground truth must be a string, got {type(gt).__name__}: {gt!r:.100}")
    gt = str(gt)
    if not normalize_answer(gt):
        raise ValueError(f"VQA ground truth {ground_truth!r} is empty")
    return gt


def answer_status(answer: str | None) -> str:
    """"missing_answer", "empty_answer" or "ok"."""
    if answer is None:
        return "missing_answer"
    return "ok" if answer.strip() else "empty_answer"


def _score(completion: str, ground_truth: Any, multiple_choice: bool) -> RewardBreakdown:
    gt = _gt_text(ground_truth)
    answer = extract_answer(completion)
    verdict = judge_answer(answer, gt, multiple_choice=multiple_choice)
    return RewardBreakdown(
        format_score(completion, json_block=False),
        1.0 if verdict.correct else 0.0,
        answer_status(answer),
        {"answer": answer, "hedged": verdict.hedged},
    )


@register_reward("vqa", max_reward=VQA_MAX_REWARD)
def vqa_reward(completion: str, ground_truth: Any) -> RewardBreakdown:
    """Free-form VQA reward (yes/no, short answers, "two or 2")."""
    return _score(completion, ground_truth, multiple_choice=False)


@register_reward("mcq", max_reward=VQA_MAX_REWARD)
def mcq_reward(completion: str, ground_truth: Any) -> RewardBreakdown:
    """Multiple-choice reward (choice letter in the answer)."""
    return _score(completion, ground_truth, multiple_choice=True)
