"""Loaders for the two published formats (SPEC section 7).

* :func:`load_eval_json`: the evaluation files (``data/questions/*.json``): a JSON list
  (or JSON lines) of chat messages ``{"role": "user", "content": [{"type": "image",
  "image": path} x M, {"type": "text", "text": question}], "ground_truth": ...,
  "extra_info": {...}?}``. ``{"messages": [...], "ground_truth": ...}`` entries load too.
* :func:`load_parquet`: the training parquet (pyarrow): columns ``prompt`` (messages with
  ``<image>`` placeholders), ``images``, ``data_source``, ``reward_model`` (struct with
  ``ground_truth``, ``<answer>``-wrapped) and ``extra_info``.
* :func:`load_samples`: either, by file extension.

Every sample is checked when the file is read (images vs placeholders, image references,
ground truth present); all problems are reported together in one DataFormatError naming
each sample id. Images themselves are decoded lazily (``Sample.images``).
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable

from .images import image_ref_problem
from .messages import normalise_messages
from .sample import DataFormatError, Sample, raise_problems
from .tasks import infer_task

__all__ = ["load_eval_json", "load_parquet", "load_samples"]


def _sample_id(extra_info: Any, fallback: Any) -> str:
    if isinstance(extra_info, dict):
        for key in ("sample_id", "id", "index"):
            if extra_info.get(key) is not None:
                return str(extra_info[key])
    return str(fallback)


def _build(
    *, sid, messages, images, ground_truth, data_source, extra_info, task, image_root, check_images, problems
) -> Sample | None:
    try:
        msgs, refs = normalise_messages(messages, images)
    except ValueError as exc:
        problems.append((sid, str(exc)))
        return None
    if not refs:
        problems.append((sid, "has no images; a multi-source sample needs at least one"))
        return None
    for j, ref in enumerate(refs):
        why = image_ref_problem(ref, image_root, check_files=check_images)
        if why:
            problems.append((sid, f"image {j}: {why}"))
            return None
    if ground_truth is None or (isinstance(ground_truth, str) and not ground_truth.strip()):
        problems.append((sid, "has no ground truth"))
        return None
    return Sample(
        id=sid,
        messages=msgs,
        image_refs=refs,
        ground_truth=ground_truth,
        task=task or infer_task(data_source, ground_truth),
        data_source=data_source,
        extra_info=extra_info if isinstance(extra_info, dict) else {},
        image_root=None if image_root is None else os.fspath(image_root),
    )


def _check_unique(path: str, samples: list[Sample]) -> None:
    seen, dup = set(), []
    for s in samples:
        if s.id in seen:
            dup.append((s.id, "duplicate sample id"))
        seen.add(s.id)
    raise_problems(path, dup)


def load_eval_json(
    path: str | os.PathLike,
    *,
    image_root: str | os.PathLike | None = None,
    task: str | None = None,
    check_images: bool = True,
    limit: int | None = None,
) -> list[Sample]:
    """Samples of an evaluation JSON / JSONL file.

    image_root: base of relative image paths (default: the file's directory).
    task: force a task for all samples (default: inferred from the file name, then from
        each ground truth).
    check_images: check that image files exist while loading.
    limit: keep only the first ``limit`` entries.
    Raises DataFormatError listing every malformed sample by id.
    """
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        if path.endswith(".jsonl"):
            entries = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            entries = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataFormatError(f"{path}: not valid JSON ({exc})") from None
    if isinstance(entries, dict):
        entries = entries.get("data", entries.get("samples", entries))
    if not isinstance(entries, list):
        raise DataFormatError(f"{path}: expected a JSON list of samples, got {type(entries).__name__}")
    if limit is not None:
        entries = entries[:limit]
    root = os.path.dirname(os.path.abspath(path)) if image_root is None else image_root
    source = os.path.splitext(os.path.basename(path))[0]
    problems: list[tuple[str, str]] = []
    samples = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            problems.append((str(i), f"entry is a {type(entry).__name__}, expected a dict"))
            continue
        extra = entry.get("extra_info") or {}
        sid = _sample_id(extra, entry.get("id", i))
        if "messages" in entry:
            messages = entry["messages"]
        elif "content" in entry:
            messages = [{"role": entry.get("role", "user"), "content": entry["content"]}]
        else:
            problems.append((sid, "has neither 'content' nor 'messages'"))
            continue
        gt = entry.get("ground_truth")
        if gt is None and isinstance(entry.get("reward_model"), dict):
            gt = entry["reward_model"].get("ground_truth")
        s = _build(
            sid=sid, messages=messages, images=entry.get("images"), ground_truth=gt,
            data_source=entry.get("data_source") or source, extra_info=extra, task=task,
            image_root=root, check_images=check_images, problems=problems,
        )
        if s is not None:
            samples.append(s)
    raise_problems(path, problems)
    _check_unique(path, samples)
    return samples


def _rows(path: str, limit: int | None) -> Iterable[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError("reading parquet needs pyarrow: pip install 'mars[data]' (or pip install pyarrow)") from exc
    pf = pq.ParquetFile(path)
    missing = [c for c in ("prompt", "images", "reward_model") if c not in pf.schema_arrow.names]
    if missing:
        raise DataFormatError(
            f"{path}: missing column(s) {missing}; a training parquet has prompt, images, "
            f"data_source, reward_model (with ground_truth) and extra_info; found {pf.schema_arrow.names}"
        )
    n = 0
    for batch in pf.iter_batches(batch_size=256):
        for row in batch.to_pylist():
            if limit is not None and n >= limit:
                return
            n += 1
            yield row


def load_parquet(
    path: str | os.PathLike,
    *,
    image_root: str | os.PathLike | None = None,
    task: str | None = None,
    check_images: bool = True,
    limit: int | None = None,
) -> list[Sample]:
    """Samples of a training parquet file (same options as :func:`load_eval_json`).

    ``images`` entries may be paths, bytes or ``{"bytes", "path"}`` structs. The ground
    truth is ``reward_model["ground_truth"]`` as stored (``<answer>``-wrapped).
    Raises DataFormatError listing every malformed sample by id.
    """
    path = os.fspath(path)
    root = os.path.dirname(os.path.abspath(path)) if image_root is None else image_root
    problems: list[tuple[str, str]] = []
    samples = []
    for i, row in enumerate(_rows(path, limit)):
        extra = row.get("extra_info") or {}
        sid = _sample_id(extra, i)
        prompt = row.get("prompt")
        if isinstance(prompt, str):
            try:
                prompt = json.loads(prompt)
            except json.JSONDecodeError:
                prompt = [{"role": "user", "content": prompt}]
        rm = row.get("reward_model")
        gt = rm.get("ground_truth") if isinstance(rm, dict) else None
        s = _build(
            sid=sid, messages=prompt, images=row.get("images") or [], ground_truth=gt,
            data_source=row.get("data_source") or "", extra_info=extra, task=task,
            image_root=root, check_images=check_images, problems=problems,
        )
        if s is not None:
            samples.append(s)
    raise_problems(path, problems)
    _check_unique(path, samples)
    return samples


def load_samples(path: str | os.PathLike, **kwargs) -> list[Sample]:
    """:func:`load_parquet` for ``.parquet`` files, :func:`load_eval_json` for ``.json``
    / ``.jsonl``; ValueError for another extension."""
    p = os.fspath(path)
    if p.endswith(".parquet"):
        return load_parquet(p, **kwargs)
    if p.endswith((".json", ".jsonl")):
        return load_eval_json(p, **kwargs)
    raise ValueError(f"unknown data file type {p!r}: expected .json, .jsonl or .parquet")
