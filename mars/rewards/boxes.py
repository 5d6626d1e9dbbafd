"""Boxes: parsing predictions and ground truths, safe IoU and Hungarian matching.

Boxes are absolute ``[x1, y1, x2, y2]`` (pixels). A box is *valid* when its four
coordinates are finite numbers with x2 > x1 and y2 > y1; an invalid box has IoU 0 with
everything (never negative, never NaN). The rules are in docs/rewards.md ("Grounding").

Parsing is total on predictions: any string gives boxes or a parse status, never an
exception. A number too large for a float ("1e400", "9" * 5000, ``-1e309``) becomes an
infinite coordinate, i.e. an invalid box, never an OverflowError or the interpreter's
int-digits ValueError; NaN and Infinity make invalid boxes too; nesting too deep for the
JSON parser is a parse failure ("bad_json"). All of it runs in time linear in the length
of the answer.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np

from .tags import extract_answer, json_blocks

__all__ = ["valid_box", "box_iou", "iou_matrix", "hungarian_match", "parse_pred_boxes", "parse_gt_boxes"]

_NAN_BOX = [math.nan] * 4


def _number(v: Any) -> float | None:
    """A coordinate as a float (+-inf when it overflows a float), or None when it is not
    a number (bool, str, None, list ...)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        return float(v)
    except OverflowError:  # a Python int beyond the float range
        return math.inf if v > 0 else -math.inf


_PLAIN_NUMBER = frozenset({int, float})  # exact types: bool (an int subclass) is not a coordinate


def _coords(box: Any) -> list[float] | None:
    """The four coordinates of a box-shaped entry (a 4-list/tuple of numbers, or a dict
    holding one under "bbox_2d" / "bbox"), possibly non-finite; None for any other shape."""
    if isinstance(box, dict):
        box = box.get("bbox_2d", box.get("bbox"))
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        return None
    a, b, c, d = box
    if type(a) in _PLAIN_NUMBER and type(b) in _PLAIN_NUMBER and type(c) in _PLAIN_NUMBER and type(d) in _PLAIN_NUMBER:
        try:  # the common case, without a call per coordinate
            return [float(a), float(b), float(c), float(d)]
        except OverflowError:
            pass
    out = []
    for v in box:
        x = _number(v)
        if x is None:
            return None
        out.append(x)
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


_CONTAINERS = (dict, list, tuple)


def _box_array(boxes: list) -> tuple[np.ndarray, np.ndarray]:
    """[n, 4] float64 coordinates (NaN rows for entries that are not box-shaped) and the
    [n] validity mask of :func:`valid_box`. A fast path (comprehensions, one numpy
    conversion) reads dicts and 4-lists of plain ints/floats; every other entry goes
    through :func:`_coords`. Same values either way."""
    f = _PLAIN_NUMBER
    arr = np.full((len(boxes), 4), np.nan)
    shaped = [i for i, b in enumerate(boxes) if isinstance(b, _CONTAINERS)]  # the rest: not boxes
    inner = [(b.get("bbox_2d", b.get("bbox")) if type(b) is dict else b) for b in (boxes[i] for i in shaped)]
    fast = [
        type(b) is list and len(b) == 4 and type(b[0]) in f and type(b[1]) in f
        and type(b[2]) in f and type(b[3]) in f
        for b in inner
    ]
    good = [i for i, ok in zip(shaped, fast) if ok]
    try:
        if good:
            arr[good] = np.array([b for b, ok in zip(inner, fast) if ok], dtype=np.float64)
    except OverflowError:  # an int beyond the float range: per entry, as _coords reads it
        arr[good] = [_coords(boxes[i]) for i in good]
    for i in [i for i, ok in zip(shaped, fast) if not ok]:
        c = _coords(boxes[i])
        if c is not None:
            arr[i] = c
    valid = np.isfinite(arr).all(axis=1) & (arr[:, 2] > arr[:, 0]) & (arr[:, 3] > arr[:, 1])
    return arr, valid


_ROWS_PER_CHUNK = 2048  # predictions per block of the IoU matrix (keeps the temporaries in cache)


def iou_matrix(preds: list, gts: list) -> np.ndarray:
    """[n_pred, n_gt] float64 matrix of :func:`box_iou`, computed with the same float64
    operations in the same order (so bit for bit equal), vectorised over the boxes in
    blocks of predictions."""
    m = np.zeros((len(preds), len(gts)), dtype=np.float64)
    if not preds or not gts:
        return m
    p, pv = _box_array(preds)
    g, gv = _box_array(gts)
    p, g = p[pv], g[gv]
    if not len(p) or not len(g):
        return m
    out = np.empty((len(p), len(g)), dtype=np.float64)
    gx1, gy1, gx2, gy2 = g[:, 0], g[:, 1], g[:, 2], g[:, 3]
    with np.errstate(all="ignore"):  # overflow to inf / nan is masked out below
        area_g = (gx2 - gx1) * (gy2 - gy1)
        for start in range(0, len(p), _ROWS_PER_CHUNK):
            c = p[start:start + _ROWS_PER_CHUNK]
            iw = np.minimum(c[:, 2:3], gx2) - np.maximum(c[:, 0:1], gx1)
            ih = np.minimum(c[:, 3:4], gy2) - np.maximum(c[:, 1:2], gy1)
            inter = iw * ih
            union = ((c[:, 2] - c[:, 0]) * (c[:, 3] - c[:, 1]))[:, None] + area_g - inter
            iou = inter / union
            ok = (iw > 0) & (ih > 0) & (union > 0) & (iou > 0) & (iou < np.inf)
            out[start:start + _ROWS_PER_CHUNK] = np.where(ok, np.minimum(iou, 1.0), 0.0)
    if gv.all():
        m[pv] = out
    else:
        m[np.ix_(pv, gv)] = out
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


# A run of 1000 or more digits: a number no float can hold exactly. Written to start with
# a character class and to try the long repetition only at the first digit of a run, so
# the search is linear.
_LONG_DIGIT_RUN = re.compile(r"[0-9](?<![0-9][0-9])[0-9]{999}")


def _loads(text: str) -> tuple[Any, bool]:
    """``(data, True)`` for JSON (or JSON written with single quotes), else ``(None, False)``.

    When the text holds a run of 1000+ digits, integers are parsed as floats (one that
    large becomes +-inf): Python's int parser is quadratic in the digit count and refuses
    more than ``sys.get_int_max_str_digits()`` digits. Integers that do not fit a float
    become +-inf in :func:`_coords`."""
    parse_int = float if _LONG_DIGIT_RUN.search(text) else None
    for candidate in (text, text.replace("'", '"')):
        try:
            return json.loads(candidate, parse_int=parse_int), True
        except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
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
