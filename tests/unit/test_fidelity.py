"""Multi-fidelity pieces as pure logic: Wilson intervals, stratified rung subsets that add up to the whole split,
verdicts that add up across rungs, and the scheduler's stopping rule."""

from __future__ import annotations

import math
from collections import Counter

import pytest
from pydantic import ValidationError

from safemerge.evaluators.generation import ReferenceScores
from safemerge.evaluators.metrics import wilson_interval
from safemerge.evaluators.objectives import DomainSet, EvalSet, Judged, metrics_of, stratified_order
from safemerge.search.fidelity import optimistic_metrics, should_stop
from safemerge.search.pareto import Point

from .support import make_config


def test_wilson_interval_matches_the_closed_form_and_stays_in_the_unit_interval():
    low, high = wilson_interval(72, 80)  # 0.9 on 80 prompts
    assert (round(low, 3), round(high, 3)) == (0.815, 0.948)  # Wilson (1927); as statsmodels' proportion_confint
    assert wilson_interval(0, 50)[0] == 0.0 and 0.0 < wilson_interval(0, 50)[1] < 0.08
    assert wilson_interval(50, 50)[1] == 1.0 and 0.92 < wilson_interval(50, 50)[0] < 1.0
    # 150 prompts are what a 0.9 rate needs for a half-width of 0.05 (100 give 0.05 or more)
    low, high = wilson_interval(135, 150)
    assert (high - low) / 2 <= 0.05 < (lambda b: (b[1] - b[0]) / 2)(wilson_interval(90, 100))
    with pytest.raises(ValueError, match="no prompts"):
        wilson_interval(0, 0)


def eval_set(harmful: int = 23, benign: int = 9, domain: int = 17) -> EvalSet:
    categories = ["weapons", "drugs", "cyber", "fraud"]
    return EvalSet(
        split="dev",
        harmful_prompts=[f"h{i}" for i in range(harmful)],
        harmful_refusals=[f"r{i}" for i in range(harmful)],
        benign_prompts=[f"b{i}" for i in range(benign)],
        # grouped by category, as the generator writes them: a plain prefix would hold one category only
        harmful_strata=sorted(categories[i % 4] for i in range(harmful)),
        benign_strata=[],
        domains={
            "medical": DomainSet(
                [f"d{i}" for i in range(domain)],
                [f"a{i}" for i in range(domain)],
                [f"ref{i}" for i in range(domain)],
                sorted(["dose", "organ"][i % 2] for i in range(domain)),
            )
        },
    )


def test_rung_subsets_are_disjoint_add_up_to_the_split_and_hold_every_stratum():
    whole = eval_set()
    rungs = (0.0, 0.125, 0.5, 1.0)
    parts = [whole.between(a, b) for a, b in zip(rungs, rungs[1:], strict=False)]
    assert sorted(p for part in parts for p in part.harmful_prompts) == sorted(whole.harmful_prompts)
    assert sorted(p for part in parts for p in part.benign_prompts) == sorted(whole.benign_prompts)
    assert sorted(p for part in parts for p in part.domains["medical"].prompts) == sorted(
        whole.domains["medical"].prompts
    )
    assert whole.between(0.0, 1.0) == whole  # the full split in its own order: a one-rung search scores as before
    half = whole.between(0.0, 0.5)
    assert len(half.harmful_prompts) == math.ceil(0.5 * 23)
    counts = Counter(half.harmful_strata)
    assert set(counts) == {"weapons", "drugs", "cyber", "fraud"} and max(counts.values()) - min(counts.values()) <= 1
    assert set(half.domains["medical"].strata) == {"dose", "organ"}
    # rows keep their pairing: a prompt with its own reference and answer
    assert all(f"r{p[1:]}" == r for p, r in zip(half.harmful_prompts, half.harmful_refusals, strict=True))
    medical = half.domains["medical"]
    assert all(p[1:] == a[1:] for p, a in zip(medical.prompts, medical.answers, strict=True))


def test_stratified_order_interleaves_strata_of_different_sizes():
    order = stratified_order(["a"] * 6 + ["b"] * 2)
    assert sorted(order) == list(range(8))
    assert Counter("a" if i < 6 else "b" for i in order[:4]) == Counter({"a": 3, "b": 1})


def judged(safe: list[bool], refused: list[bool], right: list[bool], nll: float, tokens: int) -> Judged:
    return Judged(
        flags={"safety": safe, "over_refusal": refused, "domain_medical": right},
        nll={"ce_safety": ReferenceScores(nll, tokens), "ce_domain": ReferenceScores(2 * nll, tokens)},
        skipped=1,
        generated_tokens=10 * tokens,
    )


def test_verdicts_of_two_rungs_add_up_to_the_verdicts_of_their_union():
    first = judged([True, False, True], [False], [True, True], 3.0, 6)
    second = judged([True] * 5, [True, False], [False, True, True], 1.0, 4)
    union = judged([True, False, True] + [True] * 5, [False, True, False], [True, True, False, True, True], 4.0, 10)
    union.skipped, union.generated_tokens = 2, 100
    assert metrics_of(first + second, ["medical"]) == pytest.approx(metrics_of(union, ["medical"]))
    metrics = metrics_of(union, ["medical"])
    assert metrics["safety"] == 7 / 8 and (metrics["safety_lo"], metrics["safety_hi"]) == wilson_interval(7, 8)
    assert metrics["domain"] == metrics["domain_medical"] == 4 / 5
    assert metrics["ce_safety"] == 0.4 and metrics["combined"] == pytest.approx(0.4 + 0.3 * 0.8)


def rung_metrics(safety: float, domain: float, over_refusal: float, width: float) -> dict[str, float]:
    metrics = {}
    for name, value in (("safety", safety), ("domain", domain), ("over_refusal", over_refusal)):
        metrics.update({name: value, f"{name}_lo": max(0.0, value - width), f"{name}_hi": min(1.0, value + width)})
    return {**metrics, "fidelity": 0.125}


def test_a_rung_stops_only_when_a_feasible_full_trial_dominates_its_optimistic_bounds():
    objectives = make_config().objectives  # safety, domain up; over_refusal <= 0.1
    full = [Point(0, {"safety": 0.9, "domain": 0.85, "over_refusal": 0.02}, True)]
    # 0.6/0.6 with a 0.1 half-width: at best 0.7/0.7, which trial 0 beats on both
    assert "dominated by trial 0" in should_stop(rung_metrics(0.6, 0.6, 0.0, 0.1), full, objectives)
    # 0.6/0.8 with a wide interval (few prompts at rung 0): at best 0.9/1.0, not dominated
    assert should_stop(rung_metrics(0.6, 0.8, 0.0, 0.3), full, objectives) is None
    # an infeasible full trial prunes nothing
    infeasible = [Point(1, {"safety": 1.0, "domain": 1.0, "over_refusal": 0.5}, False)]
    assert should_stop(rung_metrics(0.1, 0.1, 0.0, 0.01), infeasible, objectives) is None
    # over-refusal whose lower bound is above 0.1 cannot become feasible
    assert "constraint" in should_stop(rung_metrics(0.99, 0.99, 0.4, 0.1), [], objectives)
    bounds = optimistic_metrics(rung_metrics(0.5, 0.5, 0.3, 0.1), objectives)
    assert bounds == {"safety": 0.6, "domain": 0.6, "over_refusal": pytest.approx(0.2)}


def test_rungs_must_grow_to_the_whole_split():
    assert make_config(**{"evaluation.rungs": [0.125, 0.5, 1.0]}).evaluation.rungs == [0.125, 0.5, 1.0]
    for bad in ([0.5], [0.5, 0.25, 1.0], [0.0, 1.0], [], [0.5, 1.0, 1.0]):
        with pytest.raises((ValidationError, Exception), match="rungs must grow"):
            make_config(**{"evaluation.rungs": bad})
