"""Image references and loading (Pillow).

An image reference is what a data file stores for one image slot:

* a path (str / os.PathLike), absolute or relative to the sample's ``image_root``,
  optionally with a ``file://`` prefix;
* a ``data:image/...;base64,`` URI;
* raw encoded bytes;
* a dict ``{"bytes": ..., "path": ...}`` (Hugging Face ``datasets`` Image columns);
* a ``PIL.Image.Image``.

Remote URLs are refused (nothing is downloaded).
"""

from __future__ import annotations

import base64
import io
import os
from typing import Any

__all__ = ["resolve_path", "image_ref_problem", "load_image"]


def _pil():
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError("mars.data needs Pillow: pip install 'mars[data]' (or pip install pillow)") from exc
    return Image


def resolve_path(ref: str | os.PathLike, image_root: str | os.PathLike | None) -> str:
    """Filesystem path of a path reference (``file://`` stripped, joined to ``image_root``
    when relative)."""
    p = os.fspath(ref)
    if p.startswith("file://"):
        p = p[len("file://"):]
    p = os.path.expanduser(p)
    if not os.path.isabs(p) and image_root is not None:
        p = os.path.join(os.fspath(image_root), p)
    return p


def _is_pil(ref: Any) -> bool:
    try:
        return isinstance(ref, _pil().Image)
    except ImportError:  # pragma: no cover
        return False


def image_ref_problem(ref: Any, image_root: str | os.PathLike | None, *, check_files: bool = True) -> str | None:
    """Why ``ref`` cannot be loaded (a sentence), or None when it looks loadable.
    With ``check_files`` the path's existence is checked (the file is not opened)."""
    if isinstance(ref, dict):
        if ref.get("bytes"):
            return None
        if ref.get("path"):
            return image_ref_problem(ref["path"], image_root, check_files=check_files)
        return f"image entry has neither bytes nor path: {ref!r:.100}"
    if isinstance(ref, (bytes, bytearray, memoryview)):
        return None if len(ref) else "image bytes are empty"
    if _is_pil(ref):
        return None
    if isinstance(ref, (str, os.PathLike)):
        s = os.fspath(ref)
        if not s:
            return "image path is empty"
        if s.startswith(("http://", "https://")):
            return f"remote image URLs are not fetched ({s}); download the images and pass image_root"
        if s.startswith("data:image"):
            return None
        if check_files:
            p = resolve_path(s, image_root)
            if not os.path.isfile(p):
                return f"image file not found: {p}"
        return None
    return f"unsupported image reference of type {type(ref).__name__}"


def load_image(ref: Any, image_root: str | os.PathLike | None = None):
    """Open ``ref`` as an RGB ``PIL.Image`` (decoded fully, file closed).
    ValueError if the reference is unusable, OSError from Pillow if undecodable."""
    Image = _pil()
    if _is_pil(ref):
        return ref.convert("RGB") if ref.mode != "RGB" else ref
    problem = image_ref_problem(ref, image_root, check_files=True)
    if problem:
        raise ValueError(problem)
    if isinstance(ref, dict):
        return load_image(ref["bytes"] if ref.get("bytes") else ref["path"], image_root)
    if isinstance(ref, (bytes, bytearray, memoryview)):
        src = io.BytesIO(bytes(ref))
    elif os.fspath(ref).startswith("data:image"):
        src = io.BytesIO(base64.b64decode(os.fspath(ref).split(",", 1)[1]))
    else:
        src = resolve_path(ref, image_root)
    with Image.open(src) as im:
        im.load()
        return im.convert("RGB")
