"""Boxes: parsing predictions and ground truths, safe IoU and Hungarian matching.

Boxes are absolute ``[x1, y1, x2, y2]`` (pixels). A box is *valid* when its four
coordinates are finite numbers with x2 > x1 and y2 > y1; an invalid box has IoU 0 with
everything (never negative, never NaN).
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from .tags import extract_answer, json_blocks

__all__ = ["valid_box", "box_iou", "iou_matrix", "hungarian_match", "parse_pred_boxes", "parse_gt_boxes"]


def _coords(box: Any) -> list[float] | None:
    if isinstance(box, dict):
        box = box.get("bbox_2d", box.get("bbox"))
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        return None
    out = []
    for v in box:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return None
        out.append(float(v))
    return out


def valid_box(box: Any) -> bool:
    """True for a finite ``[x1, y1, x2, y2]`` (or ``{"bbox_2d": [...]}``) with positive area."""
    c = _coords(box)
    return c is not None and all(math.isfinite(v) for v in c) and c[2] > c[0] and c[3] > c[1]


def box_iou(a: Any, b: Any) -> float:
    """IoU in [0, 1] of two boxes; 0 if either is invalid or the arithmetic overflows."""
    if not (valid_box(a) and valid_box(b)):
        return 0.0
    ax1, ay1, ax2, ay2 = _coords(a)
    bx1, by1, bx2, by2 = _coords(b)
    iw = min(ax2, bx2) - max(ax1, bx1)
    ih = min(ay2, by2) - max(ay1, by1)
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    iou = inter / union if union > 0 else 0.0
    if not math.isfinite(iou) or iou <= 0:
        return 0.0
    return min(iou, 1.0)


def iou_matrix(preds: list, gts: list) -> np.ndarray:
    """[n_pred, n_gt] float64 matrix of :func:`box_iou`."""
    m = np.zeros((len(preds), len(gts)), dtype=np.float64)
    for i, p in enumerate(preds):
        for j, g in enumerate(gts):
            m[i, j] = box_iou(p, g)
    return m


def hungarian_match(preds: list, gts: list) -> list[float]:
    """IoUs of the one-to-one matching that maximises their total (scipy's
    ``linear_sum_assignment``); one entry per matched pair, min(n_pred, n_gt) entries."""
    if not preds or not gts:
        return []
    from scipy.optimize import linear_sum_assignment

    m = iou_matrix(preds, gts)
    rows, cols = linear_sum_assignment(m, maximize=True)
    return [float(m[r, c]) for r, c in zip(rows, cols)]


def _loads(text: str) -> tuple[Any, bool]:
    for candidate in (text, text.replace("'", '"')):
        try:
            return json.loads(candidate), True
        except Exception:  # JSONDecodeError, RecursionError, ...
            continue
    return None, False


def parse_pred_boxes(completion: str) -> tuple[list | None, str]:
    """Predicted boxes from a completion, read from its ``<answer>`` only.

    Inside the answer: the first fenced json block, or else the whole answer as JSON.
    The JSON may be a list of ``{"bbox_2d": [...], ...}`` dicts or of 4-number lists, or
    one such dict / box. Returns ``(entries, status)``: every list entry is kept (invalid
    ones later score IoU 0 but still count as predictions); ``entries`` is None and
    ``status`` says why when nothing could be read ("missing_answer", "empty_answer",
    "bad_json", "bad_boxes").
    """
    answer = extract_answer(completion)
    if answer is None:
        return None, "missing_answer"
    if not answer:
        return None, "empty_answer"
    blocks = json_blocks(answer)
    data, ok = _loads(blocks[0] if blocks else answer)
    if not ok:
        return None, "bad_json"
    if isinstance(data, dict) or _coords(data) is not None:
        data = [data]
    if not isinstance(data, list):
        return None, "bad_boxes"
    return data, "ok"


def parse_gt_boxes(ground_truth: Any) -> list[list[float]]:
    """Ground-truth boxes from a list of boxes / ``bbox_2d`` dicts, or a string holding
    their JSON (optionally inside ``<answer>`` and/or a json fence).

    Raises ValueError naming the offending entry when the ground truth is not a list of
    valid boxes: a bad ground truth is a data error, not a zero reward.
    """
    gt = ground_truth
    if isinstance(gt, str):
        inner = extract_answer(gt)
        text = inner if inner is not None else gt.strip()
        blocks = json_blocks(text)
        gt, ok = _loads(blocks[0] if blocks else text)
        if not ok:
            raise ValueError(f"grounding ground truth is not valid JSON: {ground_truth!r:.200}")
    if isinstance(gt, dict) or _coords(gt) is not None:
        gt = [gt]
    if not isinstance(gt, (list, tuple)):
        raise ValueError(f"grounding ground truth must be a list of boxes, got {type(gt).__name__}")
    out = []
    for j, box in enumerate(gt):
        if not valid_box(box):
            raise ValueError(
                f"grounding ground truth box {j} is not a valid [x1, y1, x2, y2] with x2 > x1, y2 > y1: {box!r}"
            )
        out.append(_coords(box))
    return out
