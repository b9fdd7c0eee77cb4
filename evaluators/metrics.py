"""Metrics over judged answers: refusal rates and domain answer accuracy."""

from __future__ import annotations

import re
from collections.abc import Sequence

from safemerge.evaluators.judges import is_refusal


def normalize_answer(text: str) -> str:
    """Lower case, punctuation to spaces, single spaces: 'The dose is 20 mg.' -> 'the dose is 20 mg'."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def answer_matches(answer: str, expected: str) -> bool:
    """The expected value appears in the answer as whole words ('5 mg' does not match '25 mg')."""
    pattern = r"(?<!\w)" + re.escape(normalize_answer(expected)) + r"(?!\w)"
    return re.search(pattern, normalize_answer(answer)) is not None


def accuracy(answers: Sequence[str], expected: Sequence[str]) -> float:
    if not answers:
        raise ValueError("accuracy of an empty set is undefined: the data set has no rows for this split")
    return sum(answer_matches(a, e) for a, e in zip(answers, expected, strict=True)) / len(answers)


def refusal_rate(answers: Sequence[str]) -> float:
    if not answers:
        raise ValueError("refusal rate of an empty set is undefined: the data set has no rows for this split")
    return sum(is_refusal(answer) for answer in answers) / len(answers)
