"""Mono-source variants of a TRL dataset row (docs/trl.md, "Mono-source prompts").

A TRL GRPO row is a dict with a conversational ``prompt`` and its images in an ``images``
list (or one ``image``); ``trl.data_utils.prepare_multimodal_messages`` puts image k of
the list into the k-th unfilled ``{"type": "image"}`` placeholder (or, for string
contents, prepends one placeholder per image to the first user turn). The variants have
the meaning of ``mars.data.Sample.mono`` (docs/data.md, "Mono variants"):

* ``"duplicate"`` (the paper's way): same prompt, ``images = [images[k]] * M``, so the
  placeholder count still matches;
* ``"single"``: ``images = [images[k]]`` and every image placeholder but the k-th removed
  from the prompt (a string prompt needs no edit: TRL then inserts one placeholder).

Every other column (ground truth, ids, ...) is kept, so the trainer's reward functions
score a variant with the row's own reward inputs.
"""

from __future__ import annotations

from typing import Any, Callable

from mars.data.sample import MONO_MODES

__all__ = ["MONO_MODES", "mono_examples", "row_images"]


def _is_image_part(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") == "image"


def row_images(example: dict) -> tuple[str | None, list]:
    """(column, images) of a TRL row: ("images", list), ("image", [img]) or (None, [])."""
    if example.get("images") is not None:
        imgs = example["images"]
        if not isinstance(imgs, (list, tuple)):
            raise ValueError(f"the 'images' column must hold a list of images per row, got "
                             f"{type(imgs).__name__}")
        return "images", list(imgs)
    if example.get("image") is not None:
        return "image", [example["image"]]
    return None, []


def _placeholders(prompt) -> list[tuple[int, int]]:
    """(message, part) positions of the unfilled image placeholders, in TRL's order
    (``prepare_multimodal_messages``: tool turns skipped, filled parts not counted)."""
    out = []
    for m, msg in enumerate(prompt):
        content = msg.get("content")
        if msg.get("role") == "tool" or not isinstance(content, list):
            continue
        for p, part in enumerate(content):
            if _is_image_part(part) and "image" not in part:
                out.append((m, p))
    return out


def _has_embedded_images(prompt) -> bool:
    return isinstance(prompt, list) and any(
        _is_image_part(part) and part.get("image") is not None
        for msg in prompt if isinstance(msg.get("content"), list) for part in msg["content"])


def mono_examples(example: dict, mode: str = "duplicate") -> list[dict]:
    """The M mono-source variants of one TRL row (one per image, in image order).

    Args:
        example: a row with a conversational ``prompt`` (list of messages) and ``images``
            (list of M images) or ``image``.
        mode: "duplicate" or "single" (see the module docstring).

    Returns:
        ``[variant_0, ..., variant_{M-1}]``, shallow copies of ``example`` with the images
        (and for "single" a structured prompt) replaced; ``[]`` for a row without images
        (its group then has no anchor: plain GRPO statistics).

    Raises:
        ValueError: unknown mode; images embedded in the prompt without an images column
        (the variants need the column); a structured prompt whose number of unfilled
        image placeholders is neither 0 nor M.
    """
    if mode not in MONO_MODES:
        raise ValueError(f"mono_sources must be one of {MONO_MODES} or None, got {mode!r}")
    column, images = row_images(example)
    prompt = example.get("prompt")
    if not images:
        if _has_embedded_images(prompt):
            raise ValueError("mono_sources needs the row's images in an 'images' (or 'image') column; "
                             "this row embeds them in the prompt messages")
        return []
    M = len(images)
    slots = _placeholders(prompt) if isinstance(prompt, list) else []
    if slots and len(slots) != M:
        raise ValueError(f"the row has {M} images but its prompt has {len(slots)} image placeholders")
    out = []
    for k in range(M):
        ex = dict(example)
        if mode == "duplicate":
            new_images = [images[k]] * M
        else:
            new_images = [images[k]]
            if slots:
                drop = {s for j, s in enumerate(slots) if j != k}
                ex["prompt"] = [
                    {**msg, "content": [part for p, part in enumerate(msg["content"]) if (m, p) not in drop]}
                    if isinstance(msg.get("content"), list) else msg
                    for m, msg in enumerate(prompt)]
        if column == "images":
            ex["images"] = new_images
        else:  # "image": one source, its variant is the row itself
            ex["image"] = new_images[0]
        out.append(ex)
    return out


def check_variants(variants: Any, example: dict, fn: Callable | None) -> list[dict]:
    """Validate what a ``mono_fn`` returned for ``example``: a list of dicts, each with a
    ``prompt`` and exactly the row's columns (TRL's reward call reads the columns of the
    first row from every row)."""
    name = getattr(fn, "__name__", "mono_fn")
    if not isinstance(variants, (list, tuple)):
        raise ValueError(f"{name} must return a list of examples, got {type(variants).__name__}")
    keys = set(example)
    for j, v in enumerate(variants):
        if not isinstance(v, dict) or "prompt" not in v:
            raise ValueError(f"{name} returned an element {j} that is not a dict with a 'prompt'")
        if set(v) != keys:
            missing, extra = sorted(keys - set(v)), sorted(set(v) - keys)
            raise ValueError(f"{name}: variant {j} must have the row's columns {sorted(keys)} "
                             f"(missing {missing}, extra {extra})")
    return list(variants)
