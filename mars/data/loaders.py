"""Loaders for the two published formats (docs/data.md).

* :func:`load_eval_json`: the evaluation files (``data/questions/*.json``): a JSON list
  (or JSON lines, ``.jsonl``) of chat messages ``{"role": "user", "content": [{"type":
  "image", "image": path} x M, {"type": "text", "text": question}], "ground_truth": ...,
  "extra_info": {...}?}``. ``{"messages": [...], "ground_truth": ...}`` entries load too.
* :func:`load_parquet`: the training parquet (pyarrow): columns ``prompt`` (messages with
  ``<image>`` placeholders), ``images``, ``data_source``, ``reward_model`` (struct with
  ``ground_truth``, ``<answer>``-wrapped) and ``extra_info``.
* :func:`load_samples`: either, by file extension.

Every sample is checked when the file is read: messages, images vs placeholders, image
references, sample id, and the ground truth for the sample's task (boxes for grounding,
a non-empty answer for vqa / mcq; see :mod:`mars.data.ground_truth`). All problems of a
file are reported together in one DataFormatError naming each sample id (and, for JSON
lines, the 1-based line number). Images themselves are decoded lazily (``Sample.images``).
"""

from __future__ import annotations

import json
import numbers
import os
from typing import Any, Iterable

from .ground_truth import ground_truth_problem, short_repr
from .images import image_ref_problem
from .messages import image_list, normalise_messages
from .sample import DataFormatError, Sample, raise_problems
from .tasks import check_task, infer_task_reason

__all__ = ["load_eval_json", "load_parquet", "load_samples", "check_limit"]

_ID_KEYS = ("sample_id", "id", "index")


def check_limit(limit: Any, name: str = "limit") -> int | None:
    """``limit`` as an int (or None: all samples); ValueError naming ``name`` for a
    negative number, a bool or a non-int (a negative limit would otherwise slice off the
    last samples silently)."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, numbers.Integral) or limit < 0:
        raise ValueError(f"{name} must be None (all samples) or an int >= 0, got {limit!r}")
    return int(limit)


def _check_options(limit: Any, task: Any, check_images: Any, image_root: Any) -> None:
    check_limit(limit)
    check_task(task)
    if not isinstance(check_images, bool):
        raise ValueError(f"check_images must be True or False, got {check_images!r}")
    if image_root is not None and not isinstance(image_root, (str, os.PathLike)):
        raise ValueError(f"image_root must be None or a path, got {type(image_root).__name__}")


def _id_value(value: Any, what: str) -> tuple[str | None, str | None]:
    """``(id, None)`` for a usable id value, ``(None, problem)`` otherwise."""
    if isinstance(value, str) and value.strip():
        return value, None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return str(int(value)), None
    return None, f"{what} must be a non-empty string or an int, got {short_repr(value)}"


def _sample_id(extra_info: Any, entry_id: Any, fallback: int) -> tuple[str, str | None]:
    """``(sample id, problem or None)``: ``extra_info`` sample_id / id / index, else the
    entry's ``id``, else the 0-based entry index (the id used to report a bad one)."""
    if isinstance(extra_info, dict):
        for key in _ID_KEYS:
            if extra_info.get(key) is not None:
                sid, why = _id_value(extra_info[key], f"extra_info[{key!r}]")
                return (sid, None) if why is None else (str(fallback), why)
    if entry_id is not None:
        sid, why = _id_value(entry_id, "'id'")
        return (sid, None) if why is None else (str(fallback), why)
    return str(fallback), None


def _build(
    *, sid, where, messages, images, ground_truth, data_source, extra_info, task, image_root, check_images, problems
) -> Sample | None:
    """The Sample, or None after appending every problem found to ``problems``."""
    own: list[str] = []
    msgs, refs = None, []
    try:
        msgs, refs = normalise_messages(messages, images)
    except ValueError as exc:
        own.append(str(exc))
    if msgs is not None:
        if not refs:
            own.append("has no images; a multi-source sample needs at least one")
        for j, ref in enumerate(refs):
            why = image_ref_problem(ref, image_root, check_files=check_images)
            if why:
                own.append(f"image {j}: {why}")
    if extra_info is None:
        extra_info = {}
    if not isinstance(extra_info, dict):
        own.append(f"extra_info must be a dict, got {type(extra_info).__name__}")
    if not isinstance(data_source, str):
        own.append(f"data_source must be a string, got {type(data_source).__name__}")
        data_source = ""
    if task is not None:
        why_task = "given as task="
    elif isinstance(extra_info, dict) and extra_info.get("task") is not None:
        task, why_task = extra_info["task"], "from extra_info['task']"
        try:
            check_task(task, "extra_info['task']")
        except ValueError as exc:
            own.append(str(exc))
            task = None
    else:
        task, why_task = infer_task_reason(data_source, ground_truth)
    if task is not None:
        gt_why = ground_truth_problem(task, ground_truth)
        if gt_why == "has no ground truth":
            own.append(gt_why)
        elif gt_why:
            own.append(f"bad ground truth for task {task!r} ({why_task}): {gt_why}")
    if own:
        problems.extend((sid, f"{where}: {m}" if where else m) for m in own)
        return None
    return Sample(
        id=sid,
        messages=msgs,
        image_refs=refs,
        ground_truth=ground_truth,
        task=task,
        data_source=data_source,
        extra_info=extra_info,
        image_root=None if image_root is None else os.fspath(image_root),
    )


class _Ids:
    """Duplicate sample ids, reported with where the first one was."""

    def __init__(self, problems: list, unit: str):
        self.first: dict[str, str] = {}
        self.problems = problems
        self.unit = unit

    def see(self, sid: str, where: str) -> None:
        if sid in self.first:
            prefix = f"{where}: " if self.unit == "line" else ""
            self.problems.append((sid, f"{prefix}duplicate sample id (first at {self.first[sid]})"))
        else:
            self.first[sid] = where


def _read_text(path: str) -> str:
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataFormatError(
            f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}, line {line}); "
            "data files must be UTF-8",
            path=path,
        ) from None
    return text[1:] if text.startswith("\ufeff") else text  # a byte-order mark is allowed


def _json_list(path: str, text: str) -> list:
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as exc:
        hint = "; one JSON value per line is JSON lines: name the file .jsonl" if exc.msg == "Extra data" else ""
        raise DataFormatError(f"{path}: not valid JSON ({exc}){hint}", path=path) from None
    except RecursionError:
        raise DataFormatError(f"{path}: JSON nested too deeply to read", path=path) from None
    if isinstance(entries, dict):
        for key in ("data", "samples"):
            if isinstance(entries.get(key), list):
                return entries[key]
        raise DataFormatError(
            f"{path}: expected a JSON list of samples (or {{\"data\": [...]}}), got an object with keys "
            f"{short_repr(list(entries))}",
            path=path,
        )
    if not isinstance(entries, list):
        raise DataFormatError(f"{path}: expected a JSON list of samples, got {type(entries).__name__}", path=path)
    return entries


_UNREADABLE = object()


def _jsonl_entries(text: str, limit: int | None) -> list[tuple[Any, int, str | None]]:
    """``(entry, 1-based line number, problem)`` for the first ``limit`` non-blank lines;
    a line that is not JSON has entry ``_UNREADABLE`` and says why."""
    out: list[tuple[Any, int, str | None]] = []
    for lineno, line in enumerate(text.split("\n"), 1):  # "\n" only: JSON strings may hold U+2028
        if not line.strip():
            continue
        if limit is not None and len(out) >= limit:
            break
        try:
            out.append((json.loads(line), lineno, None))
        except json.JSONDecodeError as exc:
            out.append((_UNREADABLE, lineno, f"not valid JSON ({exc.msg} at column {exc.colno})"))
        except RecursionError:
            out.append((_UNREADABLE, lineno, "JSON nested too deeply to read"))
    return out


def load_eval_json(
    path: str | os.PathLike,
    *,
    image_root: str | os.PathLike | None = None,
    task: str | None = None,
    check_images: bool = True,
    limit: int | None = None,
) -> list[Sample]:
    """Samples of an evaluation JSON / JSONL file (UTF-8).

    image_root: base of relative image paths (default: the file's directory).
    task: force a task for all samples (default: extra_info["task"], else inferred from
        the file name, then from each ground truth; docs/data.md).
    check_images: check that image files exist while loading.
    limit: keep only the first ``limit`` entries (None: all; an int >= 0, else ValueError).
        For JSON lines, the first ``limit`` non-blank lines; later lines are not read.
    Raises FileNotFoundError for a missing file and DataFormatError (one, listing every
    malformed sample by id, with line numbers for JSON lines) for a malformed one.
    """
    _check_options(limit, task, check_images, image_root)
    path = os.fspath(path)
    text = _read_text(path)
    problems: list[tuple[Any, str]] = []
    jsonl = path.endswith(".jsonl")
    if jsonl:
        located = _jsonl_entries(text, limit)
    else:
        entries = _json_list(path, text)
        located = [(e, None, None) for e in (entries[:limit] if limit is not None else entries)]
    root = os.path.dirname(os.path.abspath(path)) if image_root is None else image_root
    source = os.path.splitext(os.path.basename(path))[0]
    ids = _Ids(problems, "line" if jsonl else "entry")
    samples = []
    for i, (entry, lineno, unreadable) in enumerate(located):
        where = f"line {lineno}" if jsonl else ""
        if entry is _UNREADABLE:
            problems.append((None, f"{where}: {unreadable}"))
            continue
        if not isinstance(entry, dict):
            problems.append((str(i), f"{where + ': ' if where else ''}entry is a {type(entry).__name__}, expected a dict"))
            continue
        extra = entry.get("extra_info")
        sid, id_problem = _sample_id(extra, entry.get("id"), i)
        ids.see(sid, where or f"entry {i}")
        if id_problem:
            problems.append((sid, f"{where + ': ' if where else ''}{id_problem}"))
        if "messages" in entry:
            messages = entry["messages"]
        elif "content" in entry:
            messages = [{"role": entry.get("role", "user"), "content": entry["content"]}]
        else:
            problems.append((sid, f"{where + ': ' if where else ''}has neither 'content' nor 'messages'"))
            continue
        gt = entry.get("ground_truth")
        if gt is None and isinstance(entry.get("reward_model"), dict):
            gt = entry["reward_model"].get("ground_truth")
        ds = entry.get("data_source")
        s = _build(
            sid=sid, where=where, messages=messages, images=entry.get("images"), ground_truth=gt,
            data_source=source if ds is None or ds == "" else ds, extra_info=extra, task=task,
            image_root=root, check_images=check_images, problems=problems,
        )
        if s is not None and not id_problem:
            samples.append(s)
    raise_problems(path, problems)
    return samples


def _rows(path: str, limit: int | None) -> Iterable[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError("reading parquet needs pyarrow: pip install 'mars[data]' (or pip install pyarrow)") from exc
    if not os.path.exists(path):
        raise FileNotFoundError(2, "No such file or directory", path)
    try:
        pf = pq.ParquetFile(path)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as exc:  # pyarrow.ArrowInvalid / OSError: not a parquet file
        raise DataFormatError(f"{path}: not a readable parquet file ({exc})", path=path) from None
    names = pf.schema_arrow.names
    missing = [c for c in ("prompt", "images", "reward_model") if c not in names]
    if missing:
        raise DataFormatError(
            f"{path}: missing column(s) {missing}; a training parquet has prompt, images, "
            f"data_source, reward_model (with ground_truth) and extra_info; found {names}",
            path=path,
        )
    n = 0
    batches = pf.iter_batches(batch_size=256)
    while limit is None or n < limit:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as exc:  # a corrupt row group
            raise DataFormatError(f"{path}: unreadable parquet data after row {n} ({exc})", path=path) from None
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

    ``images`` entries may be paths, bytes or ``{"bytes", "path"}`` structs (one alone
    counts as a one-image list). The ground truth is ``reward_model["ground_truth"]`` as
    stored (``<answer>``-wrapped). Sample ids: ``extra_info`` sample_id / id / index,
    else the 0-based row index. Raises FileNotFoundError for a missing file and one
    DataFormatError listing every malformed sample by id (missing columns, an unreadable
    file: one DataFormatError naming the file). See docs/data.md.
    """
    _check_options(limit, task, check_images, image_root)
    path = os.fspath(path)
    root = os.path.dirname(os.path.abspath(path)) if image_root is None else image_root
    problems: list[tuple[Any, str]] = []
    ids = _Ids(problems, "row")
    samples = []
    for i, row in enumerate(_rows(path, limit)):
        extra = row.get("extra_info")
        sid, id_problem = _sample_id(extra, None, i)
        ids.see(sid, f"row {i}")
        if id_problem:
            problems.append((sid, id_problem))
        prompt = row.get("prompt")
        if isinstance(prompt, str):  # messages serialised as JSON, else one user turn
            try:
                parsed = json.loads(prompt)
            except (ValueError, RecursionError):
                parsed = None
            prompt = parsed if isinstance(parsed, (list, dict)) else [{"role": "user", "content": prompt}]
        rm = row.get("reward_model")
        if isinstance(rm, dict):
            gt = rm.get("ground_truth")
        else:
            gt = None
            if rm is not None:
                problems.append((sid, f"reward_model must be a struct with 'ground_truth', got {type(rm).__name__}"))
                continue
        s = _build(
            sid=sid, where="", messages=prompt, images=row.get("images"), ground_truth=gt,
            data_source=row.get("data_source") or "", extra_info=extra, task=task,
            image_root=root, check_images=check_images, problems=problems,
        )
        if s is not None and not id_problem:
            samples.append(s)
    raise_problems(path, problems)
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
