"""Grounding reward (LLVIP person detection); the full rule is in docs/rewards.md ("Grounding").

reward = format + iou_part, where

* format (0 .. 0.75): 0.25 each for one non-empty ``<think>``, one non-empty ``<answer>``
  and exactly one fenced json block inside that answer;
* iou_part: predicted boxes (from the ``<answer>`` only) are matched one-to-one to the
  ground-truth boxes by the Hungarian algorithm (maximum total IoU); a matched pair counts
  its IoU when IoU > 0.3. With S the sum of counted IoUs and n_gt >= 1 boxes,

      score   = S / n_gt * (1 + 0.3 ln n_gt)           (= S when n_gt == 1)
      penalty = min(0.5 (n_pred - n_gt) / n_gt, 1)  if n_pred > n_gt else 0
      iou_part = max(0, score - penalty)

  Every entry of the predicted list counts in n_pred; invalid, inverted or degenerate
  boxes (including coordinates too large for a float, NaN, infinities) have IoU 0.
  Unparsable answers give iou_part 0. With no ground-truth boxes (n_gt == 0) iou_part
  is 1 for an empty prediction list, else 0.

Range: any completion string gives a finite reward in [0, 0.75 + 1 + 0.3 ln n_gt]
(n_gt >= 1; [0, 1.75] for n_gt == 0). Only a malformed ground truth raises (ValueError).
"""

from __future__ import annotations

import math
from typing import Any

from .boxes import hungarian_match, parse_gt_boxes, parse_pred_boxes
from .registry import RewardBreakdown, register_reward
from .tags import format_score

__all__ = ["IOU_THRESHOLD", "grounding_iou_score", "grounding_max_reward", "grounding_reward"]

IOU_THRESHOLD = 0.3


def grounding_iou_score(pred_boxes: list, gt_boxes: list, *, iou_threshold: float = IOU_THRESHOLD) -> tuple[float, list[float]]:
    """The IoU part for parsed boxes. Returns ``(iou_part, matched_ious)``."""
    n_pred, n_gt = len(pred_boxes), len(gt_boxes)
    if n_gt == 0:
        return (1.0 if n_pred == 0 else 0.0), []
    matched = hungarian_match(pred_boxes, gt_boxes)
    s = sum(iou for iou in matched if iou > iou_threshold)
    score = s / n_gt * (1.0 + 0.3 * math.log(n_gt))
    penalty = min(0.5 * (n_pred - n_gt) / n_gt, 1.0) if n_pred > n_gt else 0.0
    return max(0.0, score - penalty), matched


def grounding_max_reward(ground_truth: Any) -> float:
    """0.75 + 1 + 0.3 ln n_gt (n_gt >= 1; 1.75 when n_gt is 0)."""
    n_gt = len(parse_gt_boxes(ground_truth))
    return 0.75 + 1.0 + 0.3 * math.log(max(n_gt, 1))


@register_reward("grounding", max_reward=grounding_max_reward)
def grounding_reward(completion: str, ground_truth: Any) -> RewardBreakdown:
    """Grounding reward of ``completion`` against ground-truth boxes (list or JSON string,
    optionally ``<answer>``-wrapped). Never raises for a completion; ValueError if the
    ground truth is malformed (not a list of valid boxes)."""
    gt = parse_gt_boxes(ground_truth)
    fmt = format_score(completion, json_block=True)
    preds, status = parse_pred_boxes(completion)
    if preds is None:
        return RewardBreakdown(fmt, 0.0, status, {"n_gt": len(gt), "n_pred": 0})
    part, matched = grounding_iou_score(preds, gt)
    return RewardBreakdown(
        fmt, part, status, {"n_gt": len(gt), "n_pred": len(preds), "matched_ious": matched}
    )
