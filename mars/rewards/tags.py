"""Reading ``<think>`` / ``<answer>`` tags and fenced json blocks out of a completion.

The rules are in docs/rewards.md ("Tags and the format part"). All functions take plain
strings, never raise on odd input and run in time linear in the length of the text: they
scan with ``str.find`` / ``str.count`` from left to right and stop at the first opening
tag that has no closing tag after it (no later one can have one either), so a completion
stuck in a loop (``"<answer>" * 100000``) costs one pass, not one pass per tag.
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

# The opening fence, case-insensitive ("```json", "```JSON"). A literal: matching it costs
# O(1) per start position.
_JSON_FENCE = re.compile(r"```json", re.IGNORECASE)
_FENCE_CLOSE = "```"


def _pairs(text: str, open_: str, close: str, first_only: bool = False) -> list[str]:
    """Contents of the non-overlapping ``open_ ... close`` pairs, left to right, each closed
    by the first ``close`` after its opening (what the non-greedy ``open_(.*?)close``
    finds), in one left-to-right pass."""
    out = []
    pos = 0
    while True:
        i = text.find(open_, pos)
        if i < 0:
            return out
        start = i + len(open_)
        j = text.find(close, start)
        if j < 0:  # unclosed: every later opening is unclosed too
            return out
        out.append(text[start:j])
        if first_only:
            return out
        pos = j + len(close)


def tag_contents(text: str, tag: str) -> list[str]:
    """Contents of every well-formed ``<tag>...</tag>`` pair in ``text``: each opening tag
    is closed by the first closing tag after it (non-greedy); pairs do not overlap."""
    return _pairs(text, f"<{tag}>", f"</{tag}>")


def has_one_nonempty(text: str, tag: str) -> bool:
    """True when ``text`` has exactly one ``<tag>`` and one ``</tag>``, in that order,
    and the content between them is not blank."""
    if text.count(f"<{tag}>") != 1 or text.count(f"</{tag}>") != 1:
        return False
    found = _pairs(text, f"<{tag}>", f"</{tag}>", first_only=True)
    return len(found) == 1 and found[0].strip() != ""


def extract_answer(text: str) -> str | None:
    """Content of the first complete ``<answer>...</answer>``, stripped; None if there is
    none (a missing or unclosed tag). An empty tag gives ``""``."""
    found = _pairs(text, "<answer>", "</answer>", first_only=True)
    return found[0].strip() if found else None


def json_blocks(text: str) -> list[str]:
    """Contents of the fenced ```json ... ``` blocks in ``text`` (the opening fence in any
    case; leading whitespace of the content dropped; each block closed by the first
    ```` ``` ```` after its opening)."""
    out = []
    pos = 0
    while True:
        m = _JSON_FENCE.search(text, pos)
        if m is None:
            return out
        j = text.find(_FENCE_CLOSE, m.end())
        if j < 0:
            return out
        out.append(text[m.end():j].lstrip())
        pos = j + len(_FENCE_CLOSE)


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
