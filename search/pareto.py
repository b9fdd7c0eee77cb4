"""The feasible Pareto front of a search and its hypervolume (moocore, the reference implementation's
authors' library), plus the hypervolume after each trial."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import moocore
import numpy as np

from safemerge.search.config import ObjectivesConfig

# Reference point per objective, in the minimization form moocore expects (maximized objectives negated):
# every objective here lives in [0, 1] (rates) or [0, inf) (cross-entropies).
REFERENCE = {"maximize": 0.0, "minimize_rate": 1.0, "minimize_ce": 20.0}


@dataclass(frozen=True)
class Point:
    """One finished trial: its number, its metrics, whether it meets the constraints."""

    number: int
    metrics: dict[str, float]
    feasible: bool


def _minimization_matrix(points: Sequence[Point], objectives: ObjectivesConfig) -> np.ndarray:
    rows = []
    for point in points:
        rows.append(
            [-point.metrics[name] for name in objectives.maximize]
            + [point.metrics[name] for name in objectives.minimize]
        )
    return np.asarray(rows, dtype=float).reshape(len(points), len(objectives.names()))


def reference_point(objectives: ObjectivesConfig) -> np.ndarray:
    minimize = [
        REFERENCE["minimize_ce"] if name.startswith("ce_") or name == "combined" else REFERENCE["minimize_rate"]
        for name in objectives.minimize
    ]
    return np.asarray([REFERENCE["maximize"]] * len(objectives.maximize) + minimize, dtype=float)


def pareto_front(points: Sequence[Point], objectives: ObjectivesConfig) -> list[Point]:
    """The feasible trials no other feasible trial dominates (ties: every copy is kept)."""
    candidates = [point for point in points if point.feasible]
    if not candidates:
        return []
    keep = moocore.is_nondominated(_minimization_matrix(candidates, objectives), keep_weakly=True)
    return [point for point, kept in zip(candidates, keep, strict=True) if kept]


def hypervolume(points: Sequence[Point], objectives: ObjectivesConfig) -> float:
    """Hypervolume of the feasible front against a fixed reference point (0 with no feasible trial)."""
    front = pareto_front(points, objectives)
    if not front:
        return 0.0
    matrix = _minimization_matrix(front, objectives)
    reference = reference_point(objectives)
    matrix = np.minimum(matrix, reference)  # a point beyond the reference adds nothing
    return float(moocore.hypervolume(matrix, ref=reference))


def hypervolume_history(points: Sequence[Point], objectives: ObjectivesConfig) -> list[float]:
    """Hypervolume after each trial, in trial order."""
    ordered = sorted(points, key=lambda point: point.number)
    return [hypervolume(ordered[: index + 1], objectives) for index in range(len(ordered))]
