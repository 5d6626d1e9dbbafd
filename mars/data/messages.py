"""Normalising chat messages of either published format to image / text parts.

Two ways a file gives images:

* evaluation JSON: content is a list of parts, image parts carry their own reference
  (``{"type": "image", "image": path}``; ``image_url`` parts are accepted too);
* training parquet: content is a string with ``<image>`` placeholders and the sample has
  an ``images`` list, filled into the placeholders in order. A single reference given
  instead of a list (a path string, bytes, a ``{"bytes", "path"}`` dict) is one image:
  a string is never read character by character (:func:`image_list`).

``normalise_messages`` returns messages whose content is a list of ``{"type": "image"}``
and ``{"type": "text", "text": ...}`` parts plus the image references in slot order. It
raises ValueError (with the counts) when placeholders and images do not match: nothing is
dropped or padded silently.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from .sample import IMAGE_PLACEHOLDER, split_placeholders

__all__ = ["normalise_messages", "image_list"]


def image_list(images: Any) -> list[Any]:
    """A sample's ``images`` as a list: None -> ``[]``; one reference (str, os.PathLike,
    bytes, dict, PIL image) -> ``[it]``; a list / tuple -> a list. ValueError otherwise."""
    if images is None:
        return []
    if isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview, dict)):
        return [images]
    if isinstance(images, (list, tuple)):
        return list(images)
    from .images import _is_pil

    if _is_pil(images):
        return [images]
    raise ValueError(
        f"'images' must be a list of image references (or one path), got {type(images).__name__}"
    )


def _inline_ref(part: dict) -> Any:
    if part.get("type") == "image_url":
        url = part.get("image_url")
        return url.get("url") if isinstance(url, dict) else url
    for key in ("image", "path", "url"):
        if part.get(key) is not None:
            return part[key]
    return None


def normalise_messages(messages: Any, images: Any = None) -> tuple[list[dict], list[Any]]:
    """``(messages, image_refs)`` with content as parts; see the module docstring."""
    if isinstance(messages, dict):
        messages = [messages]
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"prompt must be a non-empty list of chat messages, got {type(messages).__name__}")
    if not messages:
        raise ValueError("prompt must be a non-empty list of chat messages, got an empty list")
    images = image_list(images)
    refs: list[Any] = []
    n_from_list = 0
    out = []
    for m, msg in enumerate(messages):
        if not isinstance(msg, dict) or "content" not in msg:
            raise ValueError(f"message {m} is not a dict with 'role' and 'content'")
        content = msg["content"]
        if isinstance(content, str):
            parts = split_placeholders(content)
        elif isinstance(content, (list, tuple)):
            parts = []
            for part in content:
                if isinstance(part, str):
                    part = {"type": "text", "text": part}
                if not isinstance(part, dict):
                    raise ValueError(f"message {m}: content part of type {type(part).__name__}")
                kind = part.get("type")
                if kind == "text":
                    text = part.get("text")
                    if not isinstance(text, str):
                        raise ValueError(f"message {m}: text part without a 'text' string")
                    parts.extend(split_placeholders(text))
                elif kind in ("image", "image_url"):
                    ref = _inline_ref(part)
                    parts.append({"type": "image", "ref": ref})
                else:
                    raise ValueError(f"message {m}: unsupported content part type {kind!r}")
        else:
            raise ValueError(f"message {m}: content must be a string or a list of parts")
        clean = []
        for p in parts:
            if p["type"] == "image":
                ref = p.get("ref")
                if ref is None:
                    if n_from_list >= len(images):
                        raise ValueError(
                            f"{_count_slots(messages)} image placeholder(s) in the prompt "
                            f"but {len(images)} image(s) in 'images'"
                        )
                    ref = images[n_from_list]
                    n_from_list += 1
                refs.append(ref)
                clean.append({"type": "image"})
            else:
                clean.append(p)
        out.append({"role": msg.get("role", "user"), "content": clean})
    if n_from_list != len(images):
        raise ValueError(
            f"{_count_slots(messages)} image placeholder(s) in the prompt but {len(images)} image(s) in 'images'"
        )
    return out, refs


def _count_slots(messages: Sequence[Any]) -> int:
    n = 0
    for msg in messages:
        content = msg.get("content") if isinstance(msg, dict) else None
        if isinstance(content, str):
            n += content.count(IMAGE_PLACEHOLDER)
        elif isinstance(content, (list, tuple)):
            for part in content:
                if isinstance(part, dict):
                    if part.get("type") in ("image", "image_url") and _inline_ref(part) is None:
                        n += 1
                    elif part.get("type") == "text" and isinstance(part.get("text"), str):
                        n += part["text"].count(IMAGE_PLACEHOLDER)
    return n
