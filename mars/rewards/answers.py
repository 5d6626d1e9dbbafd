"""Answer matching for VQA and multiple choice: normalisation, alternatives, yes/no,
choice letters and the hedging rule. The rules are written out in docs/rewards.md
("VQA accuracy", "Multiple-choice accuracy", "Hedged answers").

Pure string functions: they never raise on an odd prediction (only on an unusable ground
truth) and run in time linear in the length of their input. Every regular expression
here has only bounded repetitions, or repetitions that stop at the next word character
(so no stretch of text is rescanned from many start positions), and the ones that scan a
whole answer start with a character class so that the engine skips non-candidates in C
(docs/rewards.md, "Cost").
"""

from __future__ import annotations

import functools
import re
import string
import unicodedata
from typing import NamedTuple

__all__ = [
    "Verdict",
    "normalize_answer",
    "alternatives",
    "yes_no",
    "names_yes_and_no",
    "extract_choice",
    "choice_letters",
    "judge_answer",
    "hedged_answer",
    "answers_match",
    "choice_match",
]

_NUMBERS = {
    w: str(i)
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen "
        "fourteen fifteen sixteen seventeen eighteen nineteen twenty".split()
    )
}
_ARTICLES = frozenset({"a", "an", "the"})
# "." and "," that are not between digits ("3.5" and "1,000" keep theirs).
_DOT_COMMA = re.compile(r"[.,](?:(?<!\d.)|(?!\d))")
# Every other character that is neither a letter/digit (any script) nor whitespace --
# punctuation, symbols, control and invisible format characters, underscore -- becomes
# a space: ASCII ones by a translation table (C speed however many there are), the
# others by a character class.
_ASCII_SEPARATORS = {
    c: " " for c in range(128) if not (chr(c).isalnum() or chr(c).isspace() or chr(c) in ".,")
}
_NON_ASCII_SEPARATOR = re.compile(r"[^\w\s\x00-\x7f]")

# Words of each polarity a yes/no answer may use. An answer naming words of both
# polarities is hedged ("yes or no", "Yes/No", "yes, no", "either yes or no").
_YES_WORDS = frozenset({"yes", "yeah", "yep", "yup"})
_NO_WORDS = frozenset({"no", "nope", "nah"})


class Verdict(NamedTuple):
    """correct: the answer earns accuracy. hedged: it commits to more than one option
    (then ``correct`` is False)."""

    correct: bool
    hedged: bool


def normalize_answer(text: str) -> str:
    """Lower-case, NFKC, punctuation and symbols to spaces (keeping decimal points and
    thousands commas inside numbers), number words zero..twenty to digits, articles
    dropped from multi-word answers, whitespace collapsed."""
    t = unicodedata.normalize("NFKC", text).lower()
    t = t.translate(_ASCII_SEPARATORS)
    if not t.isascii():
        t = _NON_ASCII_SEPARATOR.sub(" ", t)
    if "." in t or "," in t:
        t = _DOT_COMMA.sub(" ", t)
    words = t.split()
    if not _NUMBERS.keys().isdisjoint(words):
        words = [_NUMBERS.get(w, w) for w in words]
    if len(words) > 1 and not _ARTICLES.isdisjoint(words):
        words = [w for w in words if w not in _ARTICLES] or words
    return " ".join(words)


def alternatives(ground_truth: str) -> set[str]:
    """Accepted normalised answers: the whole ground truth and each side of " or "
    ("two or 2" accepts "two", "2", "two or 2")."""
    out = {normalize_answer(ground_truth)}
    words = ground_truth.split()
    parts: list[list[str]] = [[]]
    for i, w in enumerate(words):
        if 0 < i < len(words) - 1 and w.lower() == "or":
            parts.append([])
        else:
            parts[-1].append(w)
    if len(parts) > 1:
        out.update(normalize_answer(" ".join(p)) for p in parts)
    out.discard("")
    return out


def yes_no(normalised: str) -> str | None:
    """"yes"/"no" when a normalised answer starts with it, else when it ends with it,
    else None ("yes, it is" -> yes; "the cup is reachable so no" -> no). Says nothing
    about hedging: see :func:`names_yes_and_no`."""
    words = normalised.split(maxsplit=1)
    if not words:
        return None
    if words[0] in ("yes", "no"):
        return words[0]
    last = normalised.rsplit(maxsplit=1)[-1]
    return last if last in ("yes", "no") else None


def names_yes_and_no(normalised: str) -> bool:
    """True when a normalised answer contains a word of each polarity (yes / yeah / yep /
    yup and no / nope / nah): "yes or no", "yes no", "no, yes" -- a hedge."""
    words = set(normalised.split())
    return not words.isdisjoint(_YES_WORDS) and not words.isdisjoint(_NO_WORDS)


# ------------------------------------------------------------------ choice letters
#
# All patterns below run on the "choice text": NFKC, whitespace runs collapsed to one
# space, stripped. A "single letter" is an ASCII letter with no letter, digit or
# underscore (\w) directly on either side that is not part of a dotted abbreviation
# ("U.S.", "J.R.R."), of a hyphenated word ("X-ray", "e-book") or of a name such as
# "C++" or "C#".

# "answer", "option" or "choice" (any case), optionally "is" and ":", optionally "(".
# Written to start with a character class (the search then skips other characters in C).
_LEAD_IN = r"[AaOoCc](?<!\w.)(?i:(?<=a)nswer|(?<=o)ption|(?<=c)hoice)(?: (?i:is))? ?:? ?[(\[]?"
_HEAD_PATTERNS = [
    (re.compile(r"[(\[]?([A-Za-z])[)\]]?[.:,]?"), "fullmatch"),  # "A", "(a)", "B.", "[C]"
    (re.compile(r"[(\[]([A-Za-z])[)\]]"), "match"),  # "(A) Biology"
    (re.compile(r"([A-Z])(?:[.:)]|$)"), "match"),  # "A. Biology", "B) ..."
    (re.compile(_LEAD_IN + r"([A-Z])[)\]]?(?![A-Za-z])"), "search"),  # "The answer is D"
]
_LEAD_IN_WORDS = ("answer", "option", "choice")
# Words that join or hedge between options, and punctuation that joins them.
_LIST_WORDS = ("or", "and", "vs", "versus", "either", "maybe", "perhaps", "possibly", "probably")
_LIST_PUNCT = ",;/&|+"
# The list words as whole words, any case; starts with a character class (see _LEAD_IN).
_LIST_WORD_RE = re.compile(
    "[" + "".join(sorted({w[0] + w[0].upper() for w in _LIST_WORDS})) + r"](?<!\w.)(?i:"
    + "|".join(f"(?<={w[0]}){w[1:]}" for w in sorted(_LIST_WORDS, key=len, reverse=True))
    + r")(?!\w)"
)
# What a list word becomes before the letter rules run: one character that is neither a
# word character nor a space, so that the rules see "A or C" as "A \x01 C".
_LIST_MARK = "\x01"
# Right after matching a letter: it is a single letter (see above).
_SINGLE = (
    r"(?<!\w.)(?!\w)"  # no word character on either side
    r"(?!\.[A-Za-z](?!\w))(?<!(?<!\w)[A-Za-z]\..)"  # not in "U.S."
    r"(?!\+\+|#)"  # not "C++", "C#"
    r"(?![-'’]\w\w)(?<!\w\w[-'’].)"  # not in "X-ray", "e-book"
)
# Clause 4 needs the text from the choice to the end to hold nothing but single letters,
# punctuation and spaces; these find what breaks that: a word character that is not an
# ASCII letter, or is followed by another word character, "++" or "#", or (unless the
# choice itself is dotted, "A.B.") starts a dotted abbreviation. They start with \w, so
# the search skips punctuation and spaces in C.
_NOT_A_RUN = re.compile(r"\w(?:(?<=[^\WA-Za-z])|(?=\w)|(?=\.[A-Za-z](?!\w))|(?=\+\+|#))")
_NOT_A_DOTTED_RUN = re.compile(r"\w(?:(?<=[^\WA-Za-z])|(?=\w)|(?=\+\+|#))")
# The choice glued to the next letter by a dot ("A.B.", "A.B.C"): then dotted letters are
# options, not an abbreviation.
_DOTTED_CHOICE = re.compile(r"[A-Za-z]\.[A-Za-z](?!\w)")
_FIRST_LETTER = re.compile(r"[A-Za-z]")


def _choice_text(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).split())


def _letter_class(exclude: str | None) -> tuple[str, str]:
    up = "".join(c for c in string.ascii_uppercase if c != exclude)
    return up, up.lower()


@functools.lru_cache(maxsize=256)
def _single_letter_pattern(exclude: str | None, dotted: bool, cases: str) -> re.Pattern:
    """A single letter other than ``exclude``, of ``cases`` "upper", "lower" or "both"."""
    up, lo = _letter_class(exclude)
    letters = {"upper": up, "lower": lo, "both": up + lo}[cases]
    return re.compile(rf"([{letters}])" + (r"(?<!\w.)(?!\w)" if dotted else _SINGLE))


@functools.lru_cache(maxsize=128)
def _named_letter_patterns(exclude: str | None, lower: bool) -> tuple[re.Pattern, re.Pattern]:
    r"""Two patterns finding a single letter that an answer names as an option, other than
    ``exclude`` (an upper-case letter, or None: any), by clauses 1-3, 5 and 6 of the rule in
    docs/rewards.md, "Hedged answers" (clause 4 is :func:`_named_letter`'s run); group 1 is the
    letter. They run on the choice text with list words replaced by _LIST_MARK. ``lower``:
    whether lower-case letters count outside brackets (the choice is written in lower case,
    or there is none).

    The first pattern starts with the letter's character class, so the search skips
    everything else in C; :data:`_SINGLE` then keeps single letters only, and the context
    is checked by lookbehinds that end after the letter (their ``.`` is the letter itself)
    and by bounded lookaheads."""
    up, lo = _letter_class(exclude)
    up_i, lo_i = up.replace("I", ""), lo.replace("i", "")  # the pronoun I: only in brackets / after a lead-in
    mark, punct = re.escape(_LIST_MARK), re.escape(_LIST_PUNCT)
    to_end = r"(?=[^\w]*\Z)"  # nothing but punctuation and spaces up to the end
    after_word = rf"(?<={mark} .)|(?<={mark}\. .)"
    after_punct = rf"(?<=[{punct}].)|(?<=[{punct}] .)"
    upper_rules = "|".join([
        # 2. right after a list word: "A or C", "either B or D", "red or C. blue"
        after_word,
        # 3. right after list punctuation, with no word or initial after it: "A, C", "A/B",
        #    "A & B." (not "Rowling, J. K.")
        rf"(?:{after_punct})(?= ?(?:\Z|[^\w .]|\.(?! ?[A-Za-z](?!\w))))",
        # 5. before list punctuation / a list word leading to another single letter:
        #    "A or B" names A, "Both A and B", "(A), (B)"
        rf"(?= ?[)\].:(\[{punct}{mark}])[)\].:]? ?[(\[]?(?: ?[{punct}{mark}]){{1,3}} ?[(\[]?"
        rf"(?:[A-HJ-Z](?!\w)|[a-z](?!\w){to_end})",
    ])
    # lower case counts after a list word / list punctuation only when it ends the answer: "(b) or c"
    lower_rules = rf"(?:{after_word}|{after_punct}){to_end}"
    # Every clause needs punctuation (or a list mark) next to the letter, past one space:
    # this gate rejects other candidates ("A A A ...") before anything else is tried.
    gate = r"(?:(?<=[^\w ].)|(?<=[^\w ] .)|(?= ?[^\w ]))"
    letters = (
        rf"([{up}{lo}]){gate}{_SINGLE}(?:"
        rf"(?<=[(\[].)(?=[)\]])"  # 1. in brackets, any case: "(C)", "[c]"
        rf"|(?<=[{up_i}])(?:{upper_rules})"
        + (rf"|(?<=[{lo_i}])(?:{lower_rules})" if lower else "")
        + ")"
    )
    # 6. after "answer", "option" or "choice": "Answer: B. Option C"
    lead_in = _LEAD_IN + rf"([{up}])[)\]]?(?![A-Za-z])"
    return re.compile(letters), re.compile(lead_in)


def _head(s: str, lead_in: bool = True) -> tuple[str | None, int]:
    """``(choice letter, which head pattern read it)`` of a choice text (``(None, -1)``
    for none); ``lead_in=False`` skips the lead-in pattern (the caller knows the text has
    no lead-in word)."""
    for k, (pat, how) in enumerate(_HEAD_PATTERNS if lead_in else _HEAD_PATTERNS[:-1]):
        m = getattr(pat, how)(s)
        if m:
            return m.group(1).upper(), k
    return None, -1


def _named_letter(marked: str, exclude: str | None, lead_in: bool, run_start: int, cases: str) -> str | None:
    """A letter other than ``exclude`` (the choice, or None) that the (marked) choice text
    names as an option, or None. ``run_start``: where clause 4's stretch starts (the
    choice's position). ``cases``: the case the choice is written in ("upper", "lower"),
    or "both" when there is no choice; lower-case letters outside brackets count only in
    "lower" / "both", and clause 4 counts only letters of ``cases``."""
    dotted = _DOTTED_CHOICE.match(marked, run_start) is not None
    if (_NOT_A_DOTTED_RUN if dotted else _NOT_A_RUN).search(marked, run_start) is None:
        m = _single_letter_pattern(exclude, dotted, cases).search(marked, run_start)
        if m:
            return m.group(1).upper()
    letters, lead = _named_letter_patterns(exclude, cases != "upper")
    m = letters.search(marked) or (lead.search(marked) if lead_in else None)
    return None if m is None else m.group(1).upper()


def extract_choice(text: str) -> str | None:
    """Upper-case choice letter from an answer ("A", "(b)", "C. Cooking", "The answer is
    D"), or None. A lone lower-case letter counts only as the whole answer or in brackets,
    so prose such as "a book" is not read as choice A. Says nothing about hedging: see
    :func:`choice_letters`."""
    return _head(_choice_text(text))[0]


def choice_letters(text: str) -> tuple[str | None, bool]:
    """``(choice, hedged)``: the letter :func:`extract_choice` reads, and whether the answer
    names at least two different letters as options (docs/rewards.md, "Hedged answers":
    "A or B", "A, C", "(A)(B)", "A. B.", "B. red or C. blue"). A letter inside option text
    ("C. A travel guide", "B. Vitamin C", "A. J. K. Rowling", "A. U.S.") is not named."""
    s = _choice_text(text)
    low = s.lower()  # only to skip patterns that cannot match (str.find runs in C)
    lead_in = any(w in low for w in _LEAD_IN_WORDS)
    head, how = _head(s, lead_in)
    marked = _LIST_WORD_RE.sub(_LIST_MARK, s) if any(w in low for w in _LIST_WORDS) else s
    run_start = 0
    if how == len(_HEAD_PATTERNS) - 1:  # read after a lead-in: the run starts at the letter
        m = _HEAD_PATTERNS[-1][0].search(marked)
        run_start = m.start(1) if m else len(marked)
    if head is not None:
        written = _FIRST_LETTER.search(marked, run_start)  # the choice as written
        cases = "lower" if written is not None and written.group().islower() else "upper"
        return head, _named_letter(marked, head, lead_in, run_start, cases) is not None
    first = _named_letter(marked, None, lead_in, 0, "both")
    return None, first is not None and _named_letter(marked, first, lead_in, 0, "both") is not None


# ------------------------------------------------------------------ verdicts


def _alternatives_checked(ground_truth: str) -> set[str]:
    alts = alternatives(ground_truth)
    if not alts:
        raise ValueError(f"ground truth {ground_truth!r} is empty after normalisation")
    return alts


def _free_form_verdict(prediction: str, ground_truth: str) -> Verdict:
    alts = _alternatives_checked(ground_truth)
    pred = normalize_answer(prediction)
    yn = {a for a in alts if a in ("yes", "no")}
    if len(yn) == 1:  # a yes/no question
        hedged = names_yes_and_no(pred)
        return Verdict(not hedged and yes_no(pred) == yn.pop(), hedged)
    if not pred:
        return Verdict(False, False)
    if pred in alts:  # includes the ground truth's own list ("two or 2")
        return Verdict(True, False)
    values = set(_or_values(pred))
    if values <= alts:  # every value it names is accepted: "2 or two", "truck or car"
        return Verdict(True, False)
    return Verdict(False, len(values) > 1)


def _or_values(normalised: str) -> list[str]:
    """The values a normalised answer lists with " or " ("either 2 or 3" -> ["2", "3"])."""
    parts = normalised.split(" or ")  # normalised text is single-spaced and stripped
    if len(parts) > 1 and parts[0].startswith("either "):
        parts[0] = parts[0][len("either "):]
    return parts


def judge_answer(prediction: str | None, ground_truth: str, *, multiple_choice: bool = False) -> Verdict:
    """Accuracy of an ``<answer>`` content against a ground-truth string, with the hedging
    rule (docs/rewards.md): a missing or blank prediction is not correct; an answer that
    commits to more than one option is ``hedged`` and not correct.

    multiple_choice: when the ground truth has a choice letter, compare choice letters
    (:func:`choice_letters`); otherwise (and for free-form VQA) normalised exact match
    against :func:`alternatives`, yes/no ground truths comparing the answer's yes/no.
    Raises ValueError only for a ground truth that is empty after normalisation.
    """
    if multiple_choice:
        gt_letter = extract_choice(ground_truth)
        if gt_letter is not None:
            if prediction is None:
                return Verdict(False, False)
            letter, hedged = choice_letters(prediction)
            return Verdict(letter == gt_letter and not hedged, hedged)
    if prediction is None:
        _alternatives_checked(ground_truth)
        return Verdict(False, False)
    return _free_form_verdict(prediction, ground_truth)


def hedged_answer(prediction: str | None, ground_truth: str, *, multiple_choice: bool = False) -> bool:
    """True when ``prediction`` commits to more than one option (docs/rewards.md, "Hedged
    answers"): two different choice letters for a multiple-choice ground truth, both yes
    and no for a yes/no ground truth, or " or "-alternatives with different values for a
    free-form one (unless the answer is one of the ground truth's accepted forms)."""
    return judge_answer(prediction, ground_truth, multiple_choice=multiple_choice).hedged


def answers_match(prediction: str | None, ground_truth: str) -> bool:
    """Free-form VQA match on the answer text (docs/rewards.md, "VQA accuracy"): empty or
    missing prediction -> False; yes/no ground truths compare the prediction's yes/no, and
    an answer naming both yes and no never matches; otherwise normalised exact match
    against :func:`alternatives`, where an answer listing values with " or " matches
    when every value it names is accepted ("2 or two" for "two or 2"; "2 or 3" does not)."""
    return judge_answer(prediction, ground_truth).correct


def choice_match(prediction: str | None, ground_truth: str) -> bool:
    """Multiple-choice match (docs/rewards.md, "Multiple-choice accuracy"): when the ground
    truth has a choice letter, the answer's letter must equal it and the answer must not
    name another letter as an option; otherwise falls back to :func:`answers_match`."""
    return judge_answer(prediction, ground_truth, multiple_choice=True).correct
