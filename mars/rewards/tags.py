"""Reading ``<think>`` / ``<answer>`` tags and fenced json blocks out of a completion.

All functions take plain strings and never raise on odd input.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = [
    "tag_contents",
    "has_one_nonempty",
    "extract_answer",
    "json_blocks",
    "unwrap_answer",
    "format_score",
]

_JSON_BLOCK = re.compile(r"```json\s*(.*?)```", re.DOTALL | re.IGNORECASE)


def tag_contents(text: str, tag: str) -> list[str]:
    """Contents of every well-formed ``<tag>...</tag>`` pair in ``text`` (non-greedy)."""
    return re.findall(rf"<{tag}>(.*?)</{tag}>", text, flags=re.DOTALL)


def has_one_nonempty(text: str, tag: str) -> bool:
    """True when ``text`` has exactly one ``<tag>`` and one ``</tag>``, and the content
    between them is not blank."""
    if text.count(f"<{tag}>") != 1 or text.count(f"</{tag}>") != 1:
        return False
    found = tag_contents(text, tag)
    return len(found) == 1 and found[0].strip() != ""


def extract_answer(text: str) -> str | None:
    """Content of the first complete ``<answer>...</answer>``, stripped; None if there is
    none (a missing or unclosed tag). An empty tag gives ``""``."""
    found = tag_contents(text, "answer")
    return found[0].strip() if found else None


def json_blocks(text: str) -> list[str]:
    """Contents of the fenced ```json ... ``` blocks in ``text``."""
    return _JSON_BLOCK.findall(text)


def unwrap_answer(ground_truth: Any) -> Any:
    """A ground truth as stored: strings wrapped in ``<answer>...</answer>`` (the training
    parquet) are unwrapped and stripped; anything else is returned unchanged."""
    if isinstance(ground_truth, str):
        inner = extract_answer(ground_truth)
        return inner if inner is not None else ground_truth.strip()
    return ground_truth


def format_score(text: str, *, json_block: bool) -> float:
    """0.25 for one non-empty <think>, 0.25 for one non-empty <answer> and, when
    ``json_block``, 0.25 for exactly one fenced json block inside that answer."""
    score = 0.25 * has_one_nonempty(text, "think")
    one_answer = has_one_nonempty(text, "answer")
    score += 0.25 * one_answer
    if json_block and one_answer:
        score += 0.25 * (len(json_blocks(extract_answer(text) or "")) == 1)
    return score
