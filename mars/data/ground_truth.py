"""Ground truths: their shape (for task inference) and their validation per task.

The rules (docs/data.md, "Ground truths"):

* grounding: a list of boxes ``[x1, y1, x2, y2]`` (pixels) or ``{"bbox_2d": [...]}`` /
  ``{"bbox": [...]}`` dicts, one box alone, or a string holding their JSON (optionally
  ``<answer>``-wrapped and/or in a json fence). Every box has four finite numbers with
  x2 > x1 and y2 > y1: a NaN, infinite, non-numeric, wrong-arity, inverted or zero-area
  box is a data error. The empty list ``[]`` is valid ("nobody there").
* vqa / mcq: a non-empty answer: a string (optionally ``<answer>``-wrapped), a finite
  number, or a one-element list of either. An answer that is empty after normalisation
  (``""``, ``"<answer> </answer>"``, ``"..."``) is a data error.

:func:`ground_truth_problem` returns what is wrong (a sentence) or None. A ground truth
it accepts is also accepted by the task's reward, which is checked by calling the
reward's own parser last, so loading never lets through what scoring would refuse.
"""

from __future__ import annotations

import json
import math
import re
import reprlib
from typing import Any

__all__ = ["BOX_KEYS", "short_repr", "gt_shape", "box_problem", "ground_truth_problem"]

BOX_KEYS = ("bbox_2d", "bbox")

_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = 6
_REPR.maxstring = _REPR.maxother = 60


def short_repr(value: Any) -> str:
    """A bounded repr (depth, length): safe for huge or deeply nested values."""
    try:
        return _REPR.repr(value)
    except Exception:  # a repr that raises must not hide the real problem
        return f"<{type(value).__name__}>"


def _parse_text(text: str) -> tuple[Any, bool]:
    """``(value, True)`` when ``text`` (``<answer>`` content, first json fence) is JSON
    (single quotes read as double quotes, like the grounding reward does)."""
    from mars.rewards.tags import extract_answer, json_blocks

    inner = extract_answer(text)
    body = inner if inner is not None else text.strip()
    blocks = json_blocks(body)
    body = blocks[0] if blocks else body
    for candidate in (body, body.replace("'", '"')):  # Python-style quotes, as the reward reads them
        try:
            return json.loads(candidate), True
        except (ValueError, RecursionError):
            continue
    return None, False


def _is_scalar(v: Any) -> bool:
    return isinstance(v, (str, int, float)) and not isinstance(v, bool)


def gt_shape(ground_truth: Any) -> str:
    """"boxes", "letter", "text" or "other".

    "boxes": a list or tuple without strings (the empty one included) that is not a
    one-element list of a scalar answer, or a dict with a ``bbox_2d`` / ``bbox`` key; a string is read as JSON
    first (inside ``<answer>`` / a json fence). "letter": a lone choice letter A-H
    ("B", "(C)", "D."). "text": any other string or number. "other": anything else
    (None, a dict without box key, ...).
    """
    gt = ground_truth
    if isinstance(gt, str):
        value, ok = _parse_text(gt)
        if ok and isinstance(value, (list, dict)):
            gt = value
    if isinstance(gt, (list, tuple)):
        if len(gt) == 1 and _is_scalar(gt[0]):
            gt = gt[0]
        elif any(isinstance(v, str) for v in gt):
            return "other"  # several answers: not boxes, not one answer either
        else:
            return "boxes"
    if isinstance(gt, dict):
        return "boxes" if any(k in gt for k in BOX_KEYS) else "other"
    if isinstance(gt, str):
        from mars.rewards.tags import unwrap_answer

        text = unwrap_answer(gt)
        return "letter" if re.fullmatch(r"\(?[A-H]\)?\.?", text.strip()) else "text"
    if _is_scalar(gt):
        return "text"
    return "other"


def box_problem(box: Any) -> str | None:
    """What is wrong with one ground-truth box, or None for a valid one."""
    if isinstance(box, dict):
        key = next((k for k in BOX_KEYS if k in box), None)
        if key is None:
            return f"is a dict without a 'bbox_2d' (or 'bbox') key: {short_repr(box)}"
        box = box[key]
    if not isinstance(box, (list, tuple)):
        return f"is a {type(box).__name__} ({short_repr(box)}), expected [x1, y1, x2, y2]"
    if len(box) != 4:
        return f"has {len(box)} coordinate(s), expected 4 [x1, y1, x2, y2]: {short_repr(box)}"
    names = ("x1", "y1", "x2", "y2")
    coords = []
    for name, v in zip(names, box):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return f"{name} is not a number ({short_repr(v)}): {short_repr(box)}"
        try:
            f = float(v)
        except OverflowError:
            return f"{name} is too large for a float: {short_repr(box)}"
        if not math.isfinite(f):
            return f"{name} is {f} (not finite): {short_repr(box)}"
        coords.append(f)
    x1, y1, x2, y2 = coords
    if x2 <= x1 or y2 <= y1:
        which = "x2 <= x1" if x2 <= x1 else "y2 <= y1"
        return f"is inverted or empty ({which}): {short_repr(box)}; boxes are [x1, y1, x2, y2] with x2 > x1, y2 > y1"
    return None


def _grounding_problem(ground_truth: Any) -> str | None:
    gt = ground_truth
    if isinstance(gt, str):
        gt, ok = _parse_text(gt)
        if not ok:
            return f"not a JSON list of boxes: {short_repr(ground_truth)}"
    if isinstance(gt, dict) or (
        isinstance(gt, (list, tuple)) and len(gt) == 4 and all(isinstance(v, (int, float)) for v in gt)
    ):
        gt = [gt]  # one box alone
    if not isinstance(gt, (list, tuple)):
        return f"expected a list of [x1, y1, x2, y2] boxes, got {type(gt).__name__} ({short_repr(gt)})"
    for j, box in enumerate(gt):
        why = box_problem(box)
        if why:
            return f"box {j} {why}"
    from mars.rewards.boxes import parse_gt_boxes

    try:
        parse_gt_boxes(ground_truth)
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:  # pragma: no cover - guard
        return f"refused by the grounding reward: {exc}"
    return None


def _answer_problem(ground_truth: Any) -> str | None:
    from mars.rewards.answers import normalize_answer
    from mars.rewards.tags import unwrap_answer

    gt = unwrap_answer(ground_truth)
    if isinstance(gt, (list, tuple)):
        if len(gt) != 1:
            return f"expected one answer (a string), got a {type(gt).__name__} of {len(gt)}: {short_repr(gt)}"
        gt = unwrap_answer(gt[0])
    if not _is_scalar(gt):
        return f"expected an answer string, got {type(gt).__name__} ({short_repr(gt)})"
    if isinstance(gt, float) and not math.isfinite(gt):
        return f"the answer is {gt} (not finite)"
    if not normalize_answer(str(gt)):
        return f"the answer is empty ({short_repr(ground_truth)})"
    from mars.rewards.vqa import _gt_text

    try:
        _gt_text(ground_truth)
    except (ValueError, TypeError) as exc:  # pragma: no cover - guard
        return f"refused by the VQA reward: {exc}"
    return None


def ground_truth_problem(task: str, ground_truth: Any) -> str | None:
    """What is wrong with ``ground_truth`` for ``task`` ("grounding", "vqa", "mcq"), or
    None. None (absent) and blank strings are "no ground truth". Other task names (your
    own registered rewards) only need a ground truth to be present."""
    if ground_truth is None or (isinstance(ground_truth, str) and not ground_truth.strip()):
        return "has no ground truth"
    try:
        if task == "grounding":
            return _grounding_problem(ground_truth)
        if task in ("vqa", "mcq"):
            return _answer_problem(ground_truth)
    except RecursionError:
        return "ground truth is nested too deeply"
    return None
