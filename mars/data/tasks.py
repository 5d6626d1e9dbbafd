"""Which task (reward / metric) a sample belongs to: "grounding", "vqa" or "mcq".

The rule (docs/data.md, "Tasks"), first match wins:

1. the data source name (parquet ``data_source``, else the eval file's name) contains a
   keyword: "llvip", "ground", "detect", "bbox", "refcoco" -> grounding; "ocr", "mcq",
   "choice" -> mcq; "spatial", "nuscenes", "vqa", "m4", "qa" -> vqa;
2. else the ground truth's shape (:func:`mars.data.ground_truth.gt_shape`): boxes ->
   grounding (the empty list ``[]`` too: a grounding sample with nobody there), a lone
   letter A-H -> mcq, anything else -> vqa.

The loaders then validate the ground truth for the task found, and name the rule that
chose it in the error, so a wrong guess shows up at load time (pass ``task=`` to force).
"""

from __future__ import annotations

from typing import Any

from .ground_truth import gt_shape

__all__ = ["TASKS", "infer_task", "infer_task_reason", "check_task"]

TASKS = ("grounding", "vqa", "mcq")

_BY_SOURCE = [
    (("llvip", "ground", "detect", "bbox", "refcoco"), "grounding"),
    (("ocr", "mcq", "choice"), "mcq"),
    (("spatial", "nuscenes", "vqa", "m4", "qa"), "vqa"),
]

_BY_SHAPE = {"boxes": "grounding", "letter": "mcq", "text": "vqa", "other": "vqa"}


def infer_task_reason(data_source: str | None = None, ground_truth: Any = None) -> tuple[str, str]:
    """``(task, why)``: :func:`infer_task` and a phrase saying which rule chose it."""
    ds = data_source.lower() if isinstance(data_source, str) else ""
    for keys, task in _BY_SOURCE:
        for k in keys:
            if k in ds:
                return task, f"inferred: data source {data_source!r} contains {k!r}"
    shape = gt_shape(ground_truth)
    what = {"boxes": "a list of boxes", "letter": "a choice letter", "text": "an answer",
            "other": "neither boxes nor a letter"}[shape]
    return _BY_SHAPE[shape], f"inferred: the ground truth is {what}"


def infer_task(data_source: str | None = None, ground_truth: Any = None) -> str:
    """Task from a data source name (e.g. "llvip", "OCR-VQA_eval", "spatialqa"), else from
    the ground truth's shape: boxes (the empty list included) -> grounding, a lone letter
    A-H -> mcq, else vqa. See docs/data.md."""
    return infer_task_reason(data_source, ground_truth)[0]


def check_task(task: Any, name: str = "task") -> str | None:
    """``task`` if it is None, one of TASKS or a registered reward name; else ValueError
    naming ``name``."""
    if task is None:
        return None
    if isinstance(task, str) and task in TASKS:
        return task
    from mars.rewards.registry import list_rewards

    if isinstance(task, str) and task in list_rewards():
        return task
    raise ValueError(
        f"{name} must be None, one of {TASKS} or a registered reward name ({list_rewards()}), got {task!r}"
    )
