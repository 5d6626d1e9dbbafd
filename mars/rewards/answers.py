"""Answer matching for VQA and multiple choice: normalisation, alternatives, yes/no and
choice letters. Pure string functions; they never raise on odd input."""

from __future__ import annotations

import re
import unicodedata

__all__ = ["normalize_answer", "alternatives", "yes_no", "extract_choice", "answers_match", "choice_match"]

_NUMBERS = {
    w: str(i)
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen "
        "fourteen fifteen sixteen seventeen eighteen nineteen twenty".split()
    )
}
_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(r"[!\"#$%&'()*+/:;<=>?@\[\\\]^_`{|}~\-]")
_OR = re.compile(r"\s+or\s+", re.IGNORECASE)


def normalize_answer(text: str) -> str:
    """Lower-case, NFKC, punctuation to spaces (keeping decimal points and thousands
    commas inside numbers), number words zero..twenty to digits, articles dropped from
    multi-word answers, whitespace collapsed."""
    t = unicodedata.normalize("NFKC", text).lower()
    t = re.sub(r"(?<!\d)[.,]|[.,](?!\d)", " ", t)
    t = _PUNCT.sub(" ", t)
    words = [_NUMBERS.get(w, w) for w in t.split()]
    if len(words) > 1:
        words = [w for w in words if w not in _ARTICLES] or words
    return " ".join(words)


def alternatives(ground_truth: str) -> set[str]:
    """Accepted normalised answers: the whole ground truth and each side of " or "
    ("two or 2" accepts "two", "2", "two or 2")."""
    out = {normalize_answer(ground_truth)}
    out.update(normalize_answer(part) for part in _OR.split(ground_truth))
    out.discard("")
    return out


def yes_no(normalised: str) -> str | None:
    """"yes"/"no" when a normalised answer starts with it, else when it ends with it,
    else None ("yes, it is" -> yes; "the cup is reachable so no" -> no)."""
    words = normalised.split()
    if not words:
        return None
    if words[0] in ("yes", "no"):
        return words[0]
    if words[-1] in ("yes", "no"):
        return words[-1]
    return None


_CHOICE_PATTERNS = [
    re.compile(r"^[\(\[]?([A-Za-z])[\)\]]?[.:,]?$"),  # "A", "(a)", "B.", "[C]"
    re.compile(r"^[\(\[]([A-Za-z])[\)\]]"),  # "(A) Biology"
    re.compile(r"^([A-Z])(?:[.:)]|\s*$)"),  # "A. Biology", "B) ..."
    re.compile(r"(?i:answer|option|choice)(?:\s+(?i:is))?\s*[:：]?\s*[\(\[]?([A-Z])[\)\]]?(?![A-Za-z])"),
]


def extract_choice(text: str) -> str | None:
    """Upper-case choice letter from an answer ("A", "(b)", "C. Cooking", "The answer is
    D"), or None. A lone lower-case letter counts only as the whole answer, so prose such
    as "a book" is not read as choice A."""
    t = unicodedata.normalize("NFKC", text).strip()
    for pat in _CHOICE_PATTERNS:
        m = pat.search(t)
        if m:
            return m.group(1).upper()
    return None


def answers_match(prediction: str | None, ground_truth: str) -> bool:
    """Free-form VQA match on the answer text: empty or missing prediction -> False;
    yes/no ground truths compare the prediction's yes/no; otherwise normalised exact match
    against :func:`alternatives`."""
    if prediction is None:
        return False
    pred = normalize_answer(prediction)
    if not pred:
        return False
    alts = alternatives(ground_truth)
    if not alts:
        raise ValueError(f"ground truth {ground_truth!r} is empty after normalisation")
    gt_yn = {yes_no(a) for a in alts if a in ("yes", "no")}
    if len(gt_yn) == 1:
        return yes_no(pred) == gt_yn.pop()
    return pred in alts


def choice_match(prediction: str | None, ground_truth: str) -> bool:
    """Multiple-choice match: compares choice letters when the ground truth has one,
    otherwise falls back to :func:`answers_match`."""
    if prediction is None or not prediction.strip():
        return False
    gt_letter = extract_choice(ground_truth)
    if gt_letter is None:
        return answers_match(prediction, ground_truth)
    return extract_choice(prediction) == gt_letter
