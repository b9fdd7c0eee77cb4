"""Multi-fidelity trials: a Pareto-aware successive-halving rule as a Ray Tune scheduler.

A trial is scored on growing, stratified shares of the dev split (`evaluation.rungs`, e.g. 1/8, 1/2, all) and
reports its objectives after each rung. At every rung below the last, the scheduler takes the trial's optimistic
figures, the upper Wilson bound of each maximized rate and the lower bound of each minimized one, and stops the
trial when a feasible trial scored on the whole split dominates even those, or when even its optimistic figures
break a constraint: no more data would make it a Pareto point. A stopped trial is recorded in the study as
pruned, with its partial figures (search/searcher.py). Tune's own schedulers (ASHA, HyperBand) and Optuna's
pruners rank trials by one metric; a merge search has two or three objectives and constraints.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from safemerge.evaluators.directions import bound
from safemerge.search.config import CONSTRAINT, ObjectivesConfig
from safemerge.search.pareto import Point


def dominates(point: Point, metrics: dict[str, float], objectives: ObjectivesConfig) -> bool:
    """Whether `point` is at least as good as `metrics` on every objective and better on one."""
    pairs = [(point.metrics[n], metrics[n]) for n in objectives.maximize]
    pairs += [(metrics[n], point.metrics[n]) for n in objectives.minimize]  # (better is larger) in both
    return all(mine >= theirs for mine, theirs in pairs) and any(mine > theirs for mine, theirs in pairs)


def optimistic_metrics(metrics: dict[str, float], objectives: ObjectivesConfig) -> dict[str, float]:
    """The objectives and constraint metrics at their optimistic bounds."""
    bounds = {name: bound(metrics, name, upper=True) for name in objectives.maximize}
    bounds.update({name: bound(metrics, name, upper=False) for name in objectives.minimize})
    for name, rule in objectives.constraints.items():
        # a `<=` constraint is met more easily by a lower value, a `>=` one by a higher
        bounds[name] = bound(metrics, name, upper=CONSTRAINT.match(rule).group(1) == ">=")
    return bounds


def should_stop(metrics: dict[str, float], full_points: Sequence[Point], objectives: ObjectivesConfig) -> str | None:
    """Why a trial at an early rung should stop (None: it goes on): a feasible full-split point dominates its
    optimistic figures, or those figures still break a constraint."""
    bounds = optimistic_metrics(metrics, objectives)
    if any(violation > 0 for violation in objectives.violations(bounds)):
        return "breaks a constraint even at its optimistic bound"
    for point in full_points:
        if point.feasible and dominates(point, bounds, objectives):
            return f"dominated by trial {point.number} even at its optimistic bounds"
    return None


class ParetoHalving(FIFOScheduler):
    """Stops a multi-fidelity trial at a rung when `should_stop` says so; trials run in the order they came.

    `full_points` returns the search's trials scored on the whole split (the study's completed trials), read
    when a rung reports, so a resumed search prunes against what earlier drivers found."""

    def __init__(self, objectives: ObjectivesConfig, full_points: Callable[[], Sequence[Point]]) -> None:
        super().__init__()
        self.objectives, self.full_points = objectives, full_points
        self.stopped: dict[str, str] = {}  # Tune trial id -> why

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if result.get("fidelity", 1.0) >= 1.0:
            return TrialScheduler.CONTINUE
        reason = should_stop(result, self.full_points(), self.objectives)
        if reason is None:
            return TrialScheduler.CONTINUE
        self.stopped[trial.trial_id] = reason
        return TrialScheduler.STOP

    def __getstate__(self) -> dict:
        # Tune pickles its scheduler into the experiment state; the study behind `full_points` stays here.
        return {**self.__dict__, "full_points": None}
