"""Evaluation metrics per sample (docs/rewards.md, "Evaluation metrics").

* grounding: mIoU = (sum of Hungarian-matched IoUs, no threshold) / n_gt, extra
  predictions not penalised; a sample is correct when mIoU > 0.5. An unparsable output
  (no ``<answer>``, no readable JSON) has mIoU 0 and is counted, never dropped. With no
  ground-truth boxes, mIoU is 1 for an empty prediction and 0 otherwise.
* vqa / mcq: correct when the ``<answer>`` content matches (the reward's accuracy part,
  so a hedged answer is not correct).

``sample_metric(task, completion, ground_truth)`` returns a dict with ``correct`` (0/1),
``parse_status`` and, for grounding, ``miou``.
"""

from __future__ import annotations

from typing import Any

from .answers import answers_match, choice_match
from .boxes import hungarian_match, parse_gt_boxes, parse_pred_boxes
from .tags import extract_answer
from .vqa import _gt_text, answer_status

__all__ = ["MIOU_THRESHOLD", "grounding_metric", "vqa_metric", "sample_metric", "TASKS"]

MIOU_THRESHOLD = 0.5
TASKS = ("grounding", "vqa", "mcq")


def grounding_metric(completion: str, ground_truth: Any, *, threshold: float = MIOU_THRESHOLD) -> dict:
    """``{"correct", "miou", "parse_status", "n_pred", "n_gt"}`` for one grounding output."""
    gt = parse_gt_boxes(ground_truth)
    preds, status = parse_pred_boxes(completion)
    if preds is None:
        miou = 0.0
    elif not gt:
        miou = 1.0 if not preds else 0.0
    else:
        miou = sum(hungarian_match(preds, gt)) / len(gt)
    return {
        "correct": float(miou > threshold),
        "miou": miou,
        "parse_status": status,
        "n_pred": 0 if preds is None else len(preds),
        "n_gt": len(gt),
    }


def vqa_metric(completion: str, ground_truth: Any, *, multiple_choice: bool = False) -> dict:
    """``{"correct", "parse_status", "answer"}``: answer-only accuracy."""
    gt = _gt_text(ground_truth)
    answer = extract_answer(completion)
    ok = (choice_match if multiple_choice else answers_match)(answer, gt)
    return {"correct": float(ok), "parse_status": answer_status(answer), "answer": answer}


def sample_metric(task: str, completion: str, ground_truth: Any) -> dict:
    """Dispatch on ``task`` in TASKS; ValueError for another task name."""
    if task == "grounding":
        return grounding_metric(completion, ground_truth)
    if task in ("vqa", "mcq"):
        return vqa_metric(completion, ground_truth, multiple_choice=task == "mcq")
    raise ValueError(f"no evaluation metric for task {task!r}; known: {TASKS}")
