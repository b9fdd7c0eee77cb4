"""Sparsification of task vectors (TIES magnitude, DARE random, breadcrumbs, DELLA), one function per kind in
SPARSIFIERS. Magnitude cuts are lookups in the sorted magnitudes the engine computes once."""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from typing import Any

import numpy as np
import torch

from safemerge.merges.methods.inputs import TensorInputs

# Each sparsifier returns the masked task vector in a scratch buffer. It is called only for density < 1: at
# density 1 nothing is dropped and the caller keeps the task vector itself.


class Sparsification(StrEnum):
    none = "none"
    magnitude = "magnitude"  # TIES: keep the `density` share of largest magnitudes
    random = "random"  # DARE: keep each element with probability `density`
    breadcrumbs = "breadcrumbs"  # drop the `gamma` share of largest outliers and the smallest, keep `density`
    della = "della"  # DELLA: keep probability grows with magnitude rank within each row


def _top_mask(magnitudes: torch.Tensor, ascending: np.ndarray, count: int, mask: torch.Tensor) -> torch.Tensor:
    """mask = 1.0 on the `count` largest magnitudes, else 0.0 (ties at the cut go to the earliest elements)."""
    total = magnitudes.numel()
    if count >= total:
        return mask.fill_(1.0)
    if count <= 0:
        return mask.zero_()
    cut = ascending[total - 1 - count]  # largest magnitude that is dropped (a numpy float32)
    tied: torch.Tensor | None = None
    if cut > 0 and ascending[total - count] == cut:
        # A magnitude tie straddles the cut: `> cut` keeps too few, so add tied elements up to `count`.
        tied = (magnitudes.reshape(-1) == float(cut)).nonzero().squeeze(1)
    torch.gt(magnitudes, float(cut), out=mask)
    if tied is not None:
        kept = total - int(np.searchsorted(ascending, cut, side="right"))
        mask.view(-1)[tied[: count - kept]] = 1.0
    return mask


def _magnitude(
    inputs: TensorInputs, model: str, task_vector: torch.Tensor, density: float, buffer: int, **_: Any
) -> torch.Tensor:
    count = max(1, int(density * task_vector.numel()))
    masked = torch.abs(task_vector, out=inputs.scratch(buffer))
    _top_mask(masked, inputs.sorted_magnitudes(model), count, masked)
    return masked.mul_(task_vector)


def _breadcrumbs(
    inputs: TensorInputs, model: str, task_vector: torch.Tensor, density: float, buffer: int, gamma: float, **_: Any
) -> torch.Tensor:
    total = task_vector.numel()
    keep = int(density * total)
    outliers = int(gamma * total)
    smallest = max(0, total - keep - outliers)
    ascending = inputs.sorted_magnitudes(model)
    magnitudes = torch.abs(task_vector, out=inputs.scratch(buffer))
    upper = smallest + keep
    if (0 < smallest and ascending[smallest - 1] == ascending[smallest]) or (
        upper < total and ascending[upper - 1] == ascending[upper]
    ):
        # A magnitude tie straddles a cut (rare): which tied element stays is the order of mergekit's ascending
        # torch.sort, which no threshold reproduces, so take that sort here.
        order = torch.sort(magnitudes.reshape(-1), descending=False).indices
        mask = magnitudes.zero_()
        mask.view(-1)[order[smallest:upper]] = 1.0
        return mask.mul_(task_vector)
    # Keep ascending ranks [smallest, smallest + keep): the top (total - smallest) minus the top outliers.
    outlier_mask = _top_mask(magnitudes, ascending, total - smallest - keep, inputs.scratch(buffer + 1))
    _top_mask(magnitudes, ascending, total - smallest, magnitudes)
    return magnitudes.sub_(outlier_mask).mul_(task_vector)


def _random(
    inputs: TensorInputs, model: str, task_vector: torch.Tensor, density: float, buffer: int, **_: Any
) -> torch.Tensor:
    return inputs.keep_mask(model, density, inputs.scratch(buffer)).mul_(task_vector)


def _della(
    inputs: TensorInputs, model: str, task_vector: torch.Tensor, density: float, buffer: int, epsilon: float, **_: Any
) -> torch.Tensor:
    mask = inputs.fill_uniform(model, inputs.scratch(buffer))
    probability = torch.mul(inputs.rank_norm(model), 2 * epsilon, out=inputs.scratch(buffer + 1))
    probability.add_(density - epsilon)
    torch.lt(mask, probability, out=mask)
    return mask.mul_(task_vector)


SPARSIFIERS: dict[Sparsification, Callable[..., torch.Tensor]] = {
    Sparsification.magnitude: _magnitude,
    Sparsification.random: _random,
    Sparsification.breadcrumbs: _breadcrumbs,
    Sparsification.della: _della,
}
