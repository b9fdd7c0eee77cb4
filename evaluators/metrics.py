"""Metrics over judged answers: refusal rates, domain answer accuracy, multiple-choice picks by log-likelihood."""

from __future__ import annotations

import math
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


def choice_length(choice: str) -> int:
    """The length `acc_norm` divides a choice's log-likelihood by: lm-eval-harness's `len(choice)`, in characters
    (its `acc_bytes` divides by UTF-8 bytes instead; the two agree on ASCII text). At least 1: an empty choice
    must not divide by zero."""
    return max(1, len(choice))


def multiple_choice_picks(loglikelihoods: Sequence[float], choices: Sequence[str]) -> tuple[int, int]:
    """The choice `acc` picks (the highest summed log-likelihood) and the one `acc_norm` picks (the highest
    log-likelihood per character), as lm-eval-harness does; a tie goes to the first, as numpy's argmax."""
    if not choices or len(loglikelihoods) != len(choices):
        raise ValueError(f"{len(loglikelihoods)} log-likelihoods for {len(choices)} choices; give one per choice")
    normalized = [ll / choice_length(choice) for ll, choice in zip(loglikelihoods, choices, strict=True)]
    first_best = lambda values: max(range(len(values)), key=lambda index: (values[index], -index))  # noqa: E731
    return first_best(loglikelihoods), first_best(normalized)


WILSON_Z = 1.959963984540054  # the normal quantile of a two-sided 95% interval


def wilson_interval(successes: int, total: int, z: float = WILSON_Z) -> tuple[float, float]:
    """Wilson's score interval of a binomial share (Wilson, 1927): unlike the normal approximation it stays
    inside [0, 1] and keeps its coverage near 0 and 1, where safety and over-refusal rates live. 80 prompts at
    0.9 give about [0.81, 0.95]."""
    if total <= 0:
        raise ValueError("the interval of a share of no prompts is undefined")
    share = successes / total
    denominator = 1 + z * z / total
    centre = (share + z * z / (2 * total)) / denominator
    half_width = z * math.sqrt(share * (1 - share) / total + z * z / (4 * total * total)) / denominator
    # At 0 and at all successes a bound is exactly 0 or 1; rounding would leave it a hair inside.
    low = 0.0 if successes == 0 else max(0.0, centre - half_width)
    high = 1.0 if successes == total else min(1.0, centre + half_width)
    return low, high
