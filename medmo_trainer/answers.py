"""Reading answers out of free model text: the `<answer>` block, normalised text, VQA choices, report findings.

Shared by evaluation (`medmo_trainer.eval`) and the RL rewards (`medmo_trainer.rl.rewards`), so
both read model text alike. Nothing here raises on bad text: what cannot be read gives None or "".
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans({c: " " for c in string.punctuation})


def extract_answer(completion: object) -> str:
    """The text inside the last `<answer>...</answer>`, or the whole completion when there is none."""
    if not isinstance(completion, str):
        return ""
    blocks = _ANSWER_BLOCK.findall(completion)
    return (blocks[-1] if blocks else completion).strip()


def normalize_text(text: object) -> str:
    """Lower case, punctuation and articles removed, whitespace collapsed."""
    if not isinstance(text, str):
        return ""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
    return " ".join(text.split())


# ---------------------------------------------------------------------------------------------
# VQA

_YES_NO = re.compile(r"\b(yes|no)\b")
_LETTER_ALONE = re.compile(r"^\(?([a-z])\)?$")
_LETTER_LEADING = re.compile(r"^\(?([A-Za-z])(?:\)|\.|:)(?:\s|$)|^\(([A-Za-z])\)")
# "The answer is (C)", "Answer: **B**", "option d)": an upper-case letter, or a lower-case one set off by
# brackets or punctuation, so that "the answer is a nodule" is not read as option A.
_LETTER_PHRASE = re.compile(
    r"\b(?i:answer|option|choice)(?i:\s+is)?\s*:?\s*[*\"'`]*(?:\(([A-Za-z])\)|([A-Z])\b|([a-z])(?=[.,:)]|\s*$))"
)
_MARKUP = "*`_\"' "


def _letter(index: int) -> str:
    return chr(ord("a") + index)


def _option_letter(text: str, options: Sequence[str] | None) -> str | None:
    """The option letter a free-text answer picks, or None when it picks none (with `options`, a letter
    beyond the last option picks none)."""
    stripped = text.strip().strip(_MARKUP)
    normalized = normalize_text(stripped)
    letter = None
    if match := _LETTER_ALONE.match(stripped.lower().rstrip(".")):
        letter = match.group(1)
    elif match := _LETTER_LEADING.match(stripped):
        letter = (match.group(1) or match.group(2)).lower()
    elif match := _LETTER_PHRASE.search(stripped):
        letter = next(g for g in match.groups() if g is not None).lower()
    if letter is not None and (not options or ord(letter) - ord("a") < len(options)):
        return letter
    if options:
        option_texts = [normalize_text(o) for o in options]
        if normalized in option_texts:
            return _letter(option_texts.index(normalized))
        mentioned = [i for i, o in enumerate(option_texts) if o and re.search(rf"\b{re.escape(o)}\b", normalized)]
        if len(mentioned) == 1:
            return _letter(mentioned[0])
    return None


def read_vqa_answer(text: str, reference: str, options: Sequence[str] | None = None) -> str | None:
    """The answer `text` gives, read the way `reference` is to be compared: the first yes/no word for a
    yes/no reference; the option letter (upper case) for a multiple-choice reference (a letter, or an
    answer among `options`); else the normalised text. None when nothing can be read."""
    ref = normalize_text(reference)
    if ref in ("yes", "no"):
        found = _YES_NO.search(normalize_text(text))
        return None if found is None else found.group(1)
    if (options or _LETTER_ALONE.match(ref)) and _option_letter(reference, options) is not None:
        letter = _option_letter(text, options)
        return None if letter is None else letter.upper()
    return normalize_text(text) or None


def vqa_accuracy(prediction: str, reference: str, options: Sequence[str] | None = None) -> float | None:
    """1.0 or 0.0 for a VQA answer (compared as `read_vqa_answer` reads it); None when the prediction
    cannot be read."""
    predicted = read_vqa_answer(prediction, reference, options)
    return None if predicted is None else float(predicted == read_vqa_answer(reference, reference, options))


# ---------------------------------------------------------------------------------------------
# Reports

_CLAUSE_SPLIT = re.compile(r"[.;\n,]|\band\b|\bbut\b")
_NEGATION_CUES = re.compile(
    r"\b(?:no evidence of|negative for|free of|absence of|without|no|not|absent|ruled out|none)\b"
)
_FILLER = re.compile(
    r"\b(?:there|is|are|was|were|seen|identified|noted|visible|present|observed|demonstrated|evidence|of)\b"
)


def findings(report: str) -> set[tuple[str, bool]]:
    """The (finding, negated) pairs of a report: one per clause, negation cues removed from the key."""
    result = set()
    for clause in _CLAUSE_SPLIT.split(normalize_text_keep_clauses(report)):
        clause = " ".join(clause.split())
        if not clause:
            continue
        negated = bool(_NEGATION_CUES.search(clause))
        key = " ".join(_FILLER.sub(" ", _NEGATION_CUES.sub(" ", clause)).split())
        if key:
            result.add((key, negated))
    return result


def normalize_text_keep_clauses(text: object) -> str:
    """Lower-cased text with clause punctuation kept and other punctuation and articles removed."""
    if not isinstance(text, str):
        return ""
    text = re.sub(r"[^\w\s.;,\n]", " ", text.lower())
    return _ARTICLES.sub(" ", text)


def finding_f1(prediction: str, reference: str) -> float | None:
    """F1 of the (finding, negated) sets; None when the prediction states no finding at all."""
    predicted, expected = findings(prediction), findings(reference)
    if not predicted:
        return None if expected else 1.0
    if not expected:
        return 0.0
    true_positives = len(predicted & expected)
    return 2.0 * true_positives / (len(predicted) + len(expected))
