"""Qwen-VL chat prompts built without a processor class.

Renders ``messages`` (content as image / text parts, :mod:`mars.data`) the way the
Qwen2-VL / Qwen2.5-VL chat template does, with ``image_text(i)`` standing for image i:

    <|im_start|>system\nYou are a helpful assistant.<|im_end|>\n
    <|im_start|>user\n<|vision_start|><|image_pad|>...<|vision_end|>question<|im_end|>\n
    <|im_start|>assistant\n
"""

from __future__ import annotations

from typing import Callable

__all__ = ["DEFAULT_SYSTEM", "qwen_chat_prompt", "qwen_image_text"]

DEFAULT_SYSTEM = "You are a helpful assistant."


def qwen_image_text(num_pad_tokens: int = 1) -> str:
    """``<|vision_start|>`` + ``<|image_pad|>`` x n + ``<|vision_end|>``."""
    return "<|vision_start|>" + "<|image_pad|>" * num_pad_tokens + "<|vision_end|>"


def qwen_chat_prompt(
    messages: list[dict],
    image_text: Callable[[int], str] = lambda i: qwen_image_text(1),
    *,
    system: str | None = DEFAULT_SYSTEM,
) -> str:
    """The generation prompt for ``messages``; a system turn is added when the messages
    have none and ``system`` is not None."""
    out = []
    if system is not None and not any(m.get("role") == "system" for m in messages):
        out.append(f"<|im_start|>system\n{system}<|im_end|>\n")
    i = 0
    for m in messages:
        body = []
        for p in m["content"]:
            if p.get("type") == "image":
                body.append(image_text(i))
                i += 1
            else:
                body.append(p.get("text", ""))
        out.append(f"<|im_start|>{m.get('role', 'user')}\n{''.join(body)}<|im_end|>\n")
    out.append("<|im_start|>assistant\n")
    return "".join(out)
