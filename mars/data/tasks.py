"""Which task (reward / metric) a sample belongs to: "grounding", "vqa" or "mcq"."""

from __future__ import annotations

import re
from typing import Any

__all__ = ["TASKS", "infer_task"]

TASKS = ("grounding", "vqa", "mcq")

_BY_SOURCE = [
    (("llvip", "ground", "detect", "bbox", "refcoco"), "grounding"),
    (("ocr", "mcq", "choice"), "mcq"),
    (("spatial", "nuscenes", "vqa", "m4", "qa"), "vqa"),
]


def infer_task(data_source: str | None = None, ground_truth: Any = None) -> str:
    """Task from a data source name (e.g. "llvip", "OCR-VQA_eval", "spatialqa"), else from
    the ground truth's shape: boxes -> grounding, a lone letter A-H -> mcq, else vqa."""
    ds = (data_source or "").lower()
    for keys, task in _BY_SOURCE:
        if any(k in ds for k in keys):
            return task
    from mars.rewards.boxes import parse_gt_boxes
    from mars.rewards.tags import unwrap_answer

    try:
        if parse_gt_boxes(ground_truth):
            return "grounding"
    except ValueError:
        pass
    gt = unwrap_answer(ground_truth)
    if isinstance(gt, str) and re.fullmatch(r"\(?[A-H]\)?\.?", gt.strip()):
        return "mcq"
    return "vqa"
