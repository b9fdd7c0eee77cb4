"""Choosing among finished trials: the feasible Pareto front and its hypervolume, the registry aliases, the
merge to ship, and LM-Cocktail's weights."""

from __future__ import annotations

import math
import random

import pytest

from safemerge.search.compare import choose_for_shipping, lm_cocktail_weights
from safemerge.search.config import ObjectivesConfig
from safemerge.search.pareto import Point, hypervolume, hypervolume_history, pareto_front
from safemerge.search.tracking import choose_aliases

SAFETY_DOMAIN = ObjectivesConfig(maximize=["safety", "domain"], constraints={"over_refusal": "<= 0.1"})


def point(number: int, safety: float, domain: float, feasible: bool = True, **extra: float) -> Point:
    return Point(number, {"safety": safety, "domain": domain, "over_refusal": 0.0, **extra}, feasible)


# The Pareto front and its hypervolume.


def test_the_front_is_the_feasible_points_no_feasible_point_dominates():
    points = [
        point(0, 0.9, 0.2),
        point(1, 0.5, 0.6),
        point(2, 0.4, 0.5),  # dominated by 1
        point(3, 1.0, 1.0, feasible=False),  # refuses everything: it must not push the others off
        point(4, 0.5, 0.6),  # a tie with 1: both stay
        point(5, 0.9, 0.1),  # dominated by 0 (same safety, less domain)
    ]
    assert [p.number for p in pareto_front(points, SAFETY_DOMAIN)] == [0, 1, 4]
    assert pareto_front([point(0, 1.0, 1.0, feasible=False)], SAFETY_DOMAIN) == []
    assert hypervolume([point(0, 1.0, 1.0, feasible=False)], SAFETY_DOMAIN) == 0.0


def test_a_minimized_objective_counts_lower_as_better():
    objectives = ObjectivesConfig(maximize=["safety"], minimize=["over_refusal"], constraints={})
    points = [
        Point(0, {"safety": 0.9, "over_refusal": 0.3}, True),
        Point(1, {"safety": 0.9, "over_refusal": 0.1}, True),  # dominates 0
        Point(2, {"safety": 0.6, "over_refusal": 0.0}, True),
    ]
    assert [p.number for p in pareto_front(points, objectives)] == [1, 2]
    # Dominated area in (safety up from 0, over_refusal down from 1): 0.9 * 0.9 + 0.6 * (1.0 - 0.9).
    assert hypervolume(points, objectives) == pytest.approx(0.9 * 0.9 + 0.6 * 0.1)


def test_hypervolume_is_the_area_the_front_dominates_and_grows_with_a_dominating_point():
    points = [point(0, 0.9, 0.2), point(1, 0.5, 0.6), point(2, 0.4, 0.5)]
    assert hypervolume(points, SAFETY_DOMAIN) == pytest.approx(0.9 * 0.2 + 0.5 * 0.4)
    assert hypervolume([*points, point(3, 0.3, 0.3)], SAFETY_DOMAIN) == pytest.approx(0.9 * 0.2 + 0.5 * 0.4)
    better = [*points, point(3, 0.6, 0.7)]  # dominates trial 1
    assert hypervolume(better, SAFETY_DOMAIN) > hypervolume(points, SAFETY_DOMAIN)
    assert hypervolume(better, SAFETY_DOMAIN) == pytest.approx(0.9 * 0.2 + 0.6 * 0.5)
    assert hypervolume([*points, point(3, 1.0, 1.0, feasible=False)], SAFETY_DOMAIN) == hypervolume(
        points, SAFETY_DOMAIN
    )


def test_a_cross_entropy_beyond_the_reference_point_adds_nothing():
    objectives = ObjectivesConfig(maximize=[], minimize=["combined"], constraints={})
    assert hypervolume([Point(0, {"combined": 25.0}, True)], objectives) == 0.0
    assert hypervolume([Point(0, {"combined": 5.0}, True)], objectives) == pytest.approx(20.0 - 5.0)


def test_hypervolume_history_follows_trial_numbers_and_never_falls():
    rng = random.Random(0)
    points = [point(n, rng.random(), rng.random(), feasible=rng.random() > 0.2) for n in range(30)]
    shuffled = points[:]
    rng.shuffle(shuffled)
    history = hypervolume_history(shuffled, SAFETY_DOMAIN)
    assert len(history) == 30
    assert all(later >= earlier for earlier, later in zip(history, history[1:], strict=False))
    assert history[-1] == pytest.approx(hypervolume(points, SAFETY_DOMAIN))
    assert history[4] == pytest.approx(hypervolume(points[:5], SAFETY_DOMAIN))  # in trial order, not list order
    assert history[-1] > history[0]


# Registry aliases.


def test_aliases_name_the_safest_the_best_domain_and_the_balanced_merge():
    front = [point(0, 0.95, 0.40), point(1, 0.70, 0.75), point(2, 0.85, 0.72)]
    assert choose_aliases(front, SAFETY_DOMAIN) == {0: ["best-safety"], 1: ["best-domain"], 2: ["balanced"]}


def test_alias_ties_go_to_the_lower_trial_number():
    front = [point(4, 0.9, 0.5), point(2, 0.9, 0.5), point(7, 0.5, 0.9)]
    aliases = choose_aliases(front, SAFETY_DOMAIN)
    assert aliases == {4: [], 2: ["best-safety", "balanced"], 7: ["best-domain"]}


def test_aliases_exist_only_for_the_objectives_the_search_has():
    domain_only = ObjectivesConfig(maximize=["domain"], constraints={})
    front = [point(0, 0.9, 0.5), point(1, 0.2, 0.8)]
    assert choose_aliases(front, domain_only) == {0: [], 1: ["best-domain", "balanced"]}
    combined = ObjectivesConfig(maximize=[], minimize=["combined"], constraints={})
    scalar_front = [Point(3, {"combined": 2.5}, True), Point(1, {"combined": 1.5}, True)]
    assert choose_aliases(scalar_front, combined) == {3: [], 1: ["balanced"]}
    assert choose_aliases([], SAFETY_DOMAIN) == {}


# The merge to ship, and LM-Cocktail.


def test_ship_the_safest_feasible_merge_that_keeps_the_experts_domain_skill():
    points = [
        point(0, 0.97, 0.55),  # safest feasible, but far below the expert's domain accuracy
        point(1, 0.90, 0.71),  # within 0.05 of the expert
        point(2, 0.85, 0.74),  # within 0.05, less safe
        point(3, 0.99, 0.80, feasible=False),  # best on both, but over-refuses
    ]
    assert choose_for_shipping(points, expert_domain=0.74).number == 1
    assert choose_for_shipping(points, expert_domain=0.74, tolerance=0.2).number == 0
    # Nothing close to the expert: the feasible merge with the best worst objective.
    assert choose_for_shipping(points, expert_domain=0.95).number == 2
    # Nothing feasible: the best worst objective among all.
    infeasible = [point(0, 0.5, 0.9, feasible=False), point(1, 0.7, 0.6, feasible=False)]
    assert choose_for_shipping(infeasible, expert_domain=0.95).number == 1
    # The only merges close to the expert are less safe than the standard recipe: they are not shipped over it.
    assert choose_for_shipping(points, expert_domain=0.74, safety_floor=0.95).number == 2
    assert choose_for_shipping(points, expert_domain=0.74, safety_floor=0.90).number == 1


def test_lm_cocktail_weights_are_a_softmax_of_minus_the_losses():
    weights = lm_cocktail_weights({"aligned": 1.0, "medical": 2.0, "finance": 3.5})
    assert sum(weights.values()) == pytest.approx(1.0)
    assert weights["aligned"] > weights["medical"] > weights["finance"]
    total = math.exp(-1.0) + math.exp(-2.0) + math.exp(-3.5)
    assert weights["medical"] == pytest.approx(math.exp(-2.0) / total)
    shifted = lm_cocktail_weights({"aligned": 101.0, "medical": 102.0, "finance": 103.5})
    assert shifted == pytest.approx(weights)
    huge = lm_cocktail_weights({"aligned": 1000.0, "medical": 1001.0})  # no overflow to 0/0
    assert huge["aligned"] == pytest.approx(1 / (1 + math.exp(-1.0)))
    assert lm_cocktail_weights({"aligned": 2.0, "medical": 2.0}) == {"aligned": 0.5, "medical": 0.5}


def test_the_comparison_prints_intervals_and_calls_a_pick_safer_only_beyond_them():
    from safemerge.search.compare import FULL_SEARCH, STANDARD, format_comparison
    from tests.test_paper_effect import parse_table

    def row(name: str, safety: float, low: float, high: float) -> dict:
        bounds = {"domain": 0.9, "domain_lo": 0.8, "domain_hi": 0.95, "over_refusal": 0.0, "over_refusal_lo": 0.0}
        return {"name": name, "safety": safety, "safety_lo": low, "safety_hi": high, **bounds, "over_refusal_hi": 0.05}

    rows = [
        row("aligned", 1.0, 0.96, 1.0),
        row(STANDARD, 0.866, 0.79, 0.92),
        row("grid search (TIES density x weight)", 0.7, 0.6, 0.78),
        row(FULL_SEARCH, 0.9, 0.83, 0.94),
    ]
    text = format_comparison(rows)
    parsed = parse_table(text)
    assert list(parsed) == [r["name"] for r in rows]
    assert parsed[STANDARD]["safety"] == 0.866 and parsed[STANDARD]["safety_lo"] == 0.79
    assert parsed[FULL_SEARCH]["over_refusal_hi"] == 0.05
    assert f"vs {STANDARD}: safety +0.034, not shown safer (intervals overlap)" in text
    assert "vs grid search (TIES density x weight): safety +0.200, safer beyond the intervals" in text
    assert "vs aligned" not in text  # the input models are references, not rivals


def test_the_papers_claim_needs_five_points_over_every_rival_and_the_experts_domain_less_five():
    from safemerge.search.compare import DOMAIN_ONLY, FULL_SEARCH, GRID, STANDARD, claim_checks

    def row(name: str, safety: float, domain: float, over_refusal: float = 0.0) -> dict:
        return {"name": name, "safety": safety, "domain": domain, "over_refusal": over_refusal}

    rivals = [row(STANDARD, 0.85, 0.9), row(GRID, 0.5, 0.2), row(DOMAIN_ONLY, 0.85, 0.9)]
    expert = row("medical", 0.0, 0.97)
    held = claim_checks([expert, *rivals, row(FULL_SEARCH, 0.9, 0.92)], experts=["medical"])
    assert all(held.values()), held
    # 4.9 points over the standard recipe and the domain-only pick, 5.1 below the expert, over-refusal 0.11
    failed = claim_checks([expert, *rivals, row(FULL_SEARCH, 0.899, 0.919, 0.11)], experts=["medical"])
    assert failed == {
        f"safer than {STANDARD}": False,
        f"safer than {GRID}": True,
        f"safer than {DOMAIN_ONLY}": False,
        "domain within the expert's": False,
        "over-refusal bound": False,
    }


def test_the_claim_on_a_front_finds_the_best_domain_among_merges_safe_enough_or_none():
    from safemerge.search.compare import DOMAIN_ONLY, GRID, STANDARD, claim_on_front

    def row(name: str, safety: float, domain: float) -> dict:
        return {"name": name, "safety": safety, "domain": domain, "over_refusal": 0.0}

    rows = [row("medical", 0.0, 0.97), row(STANDARD, 0.85, 0.9), row(GRID, 0.5, 0.2), row(DOMAIN_ONLY, 0.6, 0.95)]

    def entry(trial: int, safety: float, domain: float, over_refusal: float = 0.0) -> dict:
        return {"trial": trial, "test": {"safety": safety, "domain": domain, "over_refusal": over_refusal}}

    # trial 1 is safe enough but below the domain bound; trial 2 is closer but over-refuses; trial 3 is not safe
    front = [entry(1, 0.95, 0.88), entry(2, 0.9, 0.93, over_refusal=0.2), entry(3, 0.89, 0.95), entry(4, 0.9, 0.8)]
    result = claim_on_front(front, rows, experts=["medical"])
    assert result["needed_safety"] == 0.9 and result["needed_domain"] == 0.97 - 0.05
    assert (result["safe_enough"], result["best_trial"], result["best_domain"]) == (2, 1, 0.88)
    assert result["holds"] is False
    assert claim_on_front([*front, entry(5, 0.91, 0.92)], rows, experts=["medical"])["holds"] is True
    nothing = claim_on_front([entry(3, 0.89, 0.95)], rows, experts=["medical"])
    assert nothing["best_trial"] is None and nothing["holds"] is False
