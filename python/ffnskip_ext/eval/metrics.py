"""Quality metrics, written out so their definitions are explicit and testable.

Text is compared after ``normalize``: Unicode accents removed, lower case, thousands
separators dropped ("300,000" -> "300000"), punctuation turned into spaces except a decimal
point between digits ("3.14" stays), the articles a/an/the removed, whitespace collapsed
(SQuAD-style answer normalisation).
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections.abc import Hashable, Sequence

_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")
_DECIMAL_POINT = re.compile(r"(?<=\d)\.(?=\d)")
_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")
_ARTICLES = {"a", "an", "the"}
_KEPT_POINT = "\x00"  # stands in for a decimal point while punctuation is removed


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    text = _DECIMAL_POINT.sub(_KEPT_POINT, _THOUSANDS.sub("", text))
    text = _PUNCTUATION.sub(" ", text).replace(_KEPT_POINT, ".")
    return " ".join(w for w in text.split() if w not in _ARTICLES)


def tokens(text: str) -> list[str]:
    return normalize(text).split()


def short_answer(prediction: str) -> str:
    """The first non-empty line of a prediction: models often add an explanation after it."""
    for line in prediction.splitlines():
        if line.strip():
            return line
    return ""


def exact_match(prediction: str, answers: Sequence[str]) -> bool:
    """The normalised first line of the prediction equals a normalised answer."""
    predicted = normalize(short_answer(prediction))
    return any(predicted == normalize(a) for a in answers)


def contains_match(prediction: str, answers: Sequence[str]) -> bool:
    """A normalised answer occurs in the normalised prediction as whole words."""
    predicted = f" {normalize(prediction)} "
    return any(f" {normalize(a)} " in predicted for a in answers if normalize(a))


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, O(len(a) len(b)))."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 over normalised tokens: 2PR/(P+R) with P = LCS/|prediction| and
    R = LCS/|reference|. Two empty texts agree (1.0); one empty text scores 0.0."""
    pred, ref = tokens(prediction), tokens(reference)
    if not pred or not ref:
        return float(not pred and not ref)
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def ends_in_loop(sequence: Sequence[Hashable], max_period: int = 12, min_items: int = 6) -> bool:
    """Whether a sequence (words or token ids) ends in a loop: for some period n <=
    ``max_period``, its last items are periodic with period n over at least three periods and
    at least ``min_items`` items. A final copy cut off by the length limit still counts,
    because periodicity is checked item by item (s[i] == s[i - n])."""
    for n in range(1, max_period + 1):
        repeats = 0  # trailing items equal to the item n before them
        while (repeats + n < len(sequence)
               and sequence[-1 - repeats] == sequence[-1 - repeats - n]):
            repeats += 1
        if repeats >= 2 * n and repeats + n >= min_items:
            return True
    return False


def collapsed(text: str, token_ids: Sequence[int] = ()) -> bool:
    """An answer that ends in a repeated n-gram loop, in its normalised words (which catches
    loops that differ only in punctuation) or in its token ids (which catches loops without
    spaces, such as "ashaashaasha", or runs of whitespace)."""
    return ends_in_loop(tokens(text)) or ends_in_loop(token_ids)


def first_divergence(tokens_a: Sequence[int], tokens_b: Sequence[int]) -> int:
    """Index of the first position where two token sequences differ (the common prefix
    length; equal sequences give their length)."""
    for i, (x, y) in enumerate(zip(tokens_a, tokens_b, strict=False)):
        if x != y:
            return i
    return min(len(tokens_a), len(tokens_b))


def perplexity(total_nll: float, count: int) -> float:
    """exp(mean negative log-likelihood) over ``count`` predicted tokens."""
    if count <= 0:
        raise ValueError("perplexity needs at least one predicted token")
    return math.exp(total_nll / count)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan
