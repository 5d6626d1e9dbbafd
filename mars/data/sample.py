"""One multi-source sample and its mono-source variants.

A :class:`Sample` holds chat ``messages`` whose content is a list of parts
``{"type": "image"}`` / ``{"type": "text", "text": ...}``; the i-th image part is image
slot i and is filled by ``image_refs[i]`` (see :mod:`mars.data.images`). ``images``
loads them as RGB PIL images, one per source.

Mono variants of source k (docs/data.md, "Mono variants"):

* ``"duplicate"`` (the paper's way): same messages, source k's image in every slot, so
  the placeholder count still matches;
* ``"single"``: only slot k's image part is kept (the others are removed), one image.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field, replace
from typing import Any

from .images import load_image

__all__ = ["Sample", "DataFormatError", "MONO_MODES", "IMAGE_PLACEHOLDER"]

MONO_MODES = ("duplicate", "single")
IMAGE_PLACEHOLDER = "<image>"


class DataFormatError(ValueError):
    """A data file does not follow the expected format; the message names the samples.

    ``path``: the file; ``problems``: every ``(sample_id, message)`` found (sample_id is
    None for a problem that belongs to no sample, e.g. an unreadable JSONL line). The
    message lists them all (up to ``MAX_LISTED``; ``problems`` always has all)."""

    def __init__(self, message: str, *, path: str | None = None, problems: list | None = None):
        super().__init__(message)
        self.path = path
        self.problems = list(problems or [])


@dataclass
class Sample:
    """A multi-source sample.

    id: sample id (from ``extra_info`` when the file has one, else the row index).
    messages: chat messages, content as lists of image / text parts.
    image_refs: one reference per image slot, in slot order.
    ground_truth: as stored in the file (boxes, a string, possibly ``<answer>``-wrapped).
    task: "grounding", "vqa" or "mcq" (or a registered reward name given as ``task=``);
        the ground truth was validated for it when the file was loaded (docs/data.md).
    data_source: name of the dataset (parquet ``data_source`` or the file's stem).
    extra_info: the file's extra fields for this sample.
    image_root: directory relative image paths are resolved against.
    variant: "multi", or "mono-duplicate" / "mono-single" for mono variants.
    source_index: k for a mono variant, else None.
    """

    id: str
    messages: list[dict]
    image_refs: list[Any]
    ground_truth: Any
    task: str
    data_source: str = ""
    extra_info: dict = field(default_factory=dict)
    image_root: str | None = None
    variant: str = "multi"
    source_index: int | None = None

    @property
    def num_images(self) -> int:
        """Number of image slots (= len(image_refs))."""
        return len(self.image_refs)

    @property
    def images(self) -> list:
        """The slot images as RGB PIL images (loaded on each access)."""
        return [load_image(r, self.image_root) for r in self.image_refs]

    @property
    def question(self) -> str:
        """Text of the user turns, image parts left out."""
        texts = []
        for msg in self.messages:
            if msg.get("role", "user") != "user":
                continue
            texts.extend(p["text"] for p in msg["content"] if p.get("type") == "text")
        return "".join(texts).strip()

    def mono(self, k: int, mode: str = "duplicate") -> "Sample":
        """Mono variant of source ``k`` (0 <= k < num_images); ``mode`` in MONO_MODES."""
        if mode not in MONO_MODES:
            raise ValueError(f"mode must be one of {MONO_MODES}, got {mode!r}")
        if self.variant != "multi":
            raise ValueError(f"sample {self.id!r} is already a mono variant ({self.variant})")
        if not 0 <= k < self.num_images:
            raise ValueError(f"source index {k} out of range: sample {self.id!r} has {self.num_images} images")
        if mode == "duplicate":
            messages, refs = copy.deepcopy(self.messages), [self.image_refs[k]] * self.num_images
        else:
            messages, slot = [], 0
            for msg in self.messages:
                parts = []
                for p in msg["content"]:
                    if p.get("type") == "image":
                        if slot == k:
                            parts.append(dict(p))
                        slot += 1
                    else:
                        parts.append(dict(p))
                messages.append({**msg, "content": parts})
            refs = [self.image_refs[k]]
        return replace(self, messages=messages, image_refs=refs, variant=f"mono-{mode}", source_index=k)

    def mono_variants(self, mode: str = "duplicate") -> list["Sample"]:
        """``[self.mono(k, mode) for k in range(num_images)]``."""
        return [self.mono(k, mode) for k in range(self.num_images)]

    def to_record(self) -> dict:
        """JSON-friendly description (id, task, variant, source, question, ground truth,
        image paths where they are paths)."""
        def ref_str(r):
            if isinstance(r, (str, os.PathLike)):
                return os.fspath(r)
            if isinstance(r, dict) and r.get("path"):
                return r["path"]
            return f"<{type(r).__name__}>"

        return {
            "id": self.id,
            "task": self.task,
            "variant": self.variant,
            "source": self.source_index,
            "question": self.question,
            "ground_truth": self.ground_truth,
            "images": [ref_str(r) for r in self.image_refs],
        }


def split_placeholders(text: str) -> list[dict]:
    """Content parts of a string with ``<image>`` placeholders (empty texts dropped)."""
    parts = []
    pieces = text.split(IMAGE_PLACEHOLDER)
    for i, piece in enumerate(pieces):
        if i:
            parts.append({"type": "image"})
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def count_image_parts(messages: list[dict]) -> int:
    """Number of image parts over all messages."""
    return sum(p.get("type") == "image" for m in messages for p in m["content"])


MAX_LISTED = 1000


def format_problem(sample_id: Any, message: str) -> str:
    """``"sample <id>: <message>"`` (or the message alone when there is no sample id)."""
    return f"sample {sample_id}: {message}" if sample_id is not None else message


def raise_problems(path: str, problems: list[tuple[Any, str]], max_listed: int = MAX_LISTED) -> None:
    """Raise one DataFormatError listing the ``(sample_id, message)`` problems, if any."""
    if not problems:
        return
    lines = [f"  {format_problem(sid, msg)}" for sid, msg in problems[:max_listed]]
    if len(problems) > max_listed:
        lines.append(f"  ... and {len(problems) - max_listed} more (all in the error's .problems)")
    n_samples = len({sid for sid, _ in problems if sid is not None})
    head = f"{path}: {n_samples} malformed sample(s)"
    n_other = sum(sid is None for sid, _ in problems)
    if n_other:
        head += f" and {n_other} unreadable entr{'y' if n_other == 1 else 'ies'}"
    raise DataFormatError(head + ":\n" + "\n".join(lines), path=path, problems=problems)
