"""Every merge method as data: one generalized task-arithmetic kernel configured by a table of named methods, plus
linear, slerp, nuslerp and model_stock, all matching mergekit's math tensor for tensor."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from safemerge.errors import UserError

if TYPE_CHECKING:
    from safemerge.merges.recipe import Recipe


@dataclass(frozen=True)
class Param:
    """A method parameter: shared by all models of a tensor, or one value per model (per_model)."""

    name: str
    kind: type
    default: Any = None  # None: required
    per_model: bool = False


@dataclass
class TensorInputs:
    """What a kernel sees for one tensor. Models are vectors over a basis: slot 0 is the engine's reference (base)
    tensor, slot j > 0 is the task vector of `basis[j]`; `gram` holds their dot products (float64)."""

    name: str
    basis: list[str]  # basis[0] is the reference model
    tensors: list[torch.Tensor]  # fp32, same order as basis
    gram: torch.Tensor
    l1: list[float]  # L1 norm of each basis tensor
    sorted_magnitudes: Callable[[str], np.ndarray]  # ascending |task vector|, precomputed once per engine
    rank_norm: Callable[[str], torch.Tensor]  # della's per-row magnitude rank in [0, 1], precomputed once
    fill_uniform: Callable[[str, torch.Tensor], torch.Tensor]  # U[0, 1) seeded by (recipe seed, tensor, model)
    keep_mask: Callable[[str, float, torch.Tensor], torch.Tensor]  # 1.0 with probability p, same seeding
    scratch: Callable[[int], torch.Tensor]  # reusable fp32 buffers shaped like this tensor

    def origin(self, shared: dict) -> torch.Tensor:
        """The recipe's base model as basis coefficients (zero when the recipe has no base)."""
        base = shared.get("base_model")
        return self.vector(base) if base is not None else torch.zeros(len(self.basis), dtype=torch.float64)

    def slot(self, model: str) -> int:
        return self.basis.index(model)

    def vector(self, model: str) -> torch.Tensor:
        """The model as basis coefficients: reference + its task vector."""
        coefficients = torch.zeros(len(self.basis), dtype=torch.float64)
        coefficients[0] = 1.0
        if model != self.basis[0]:
            coefficients[self.slot(model)] = 1.0
        return coefficients

    def gram_along(self, dim: int | None) -> torch.Tensor:
        """Dot products of basis tensors over all elements (dim None) or along one dim (kept for broadcasting)."""
        if dim is None:
            return self.gram
        size = len(self.basis)
        rows = []
        for i in range(size):
            rows.append(
                [(self.tensors[i].double() * self.tensors[j].double()).sum(dim, keepdim=True) for j in range(size)]
            )
        return torch.stack([torch.stack(row) for row in rows]).cpu()  # coefficients are computed on the CPU


_CHUNK = 1 << 18  # short fp32 reductions stay accurate (~3e-7); one long one drifts by up to 1e-2


def chunked_dot(left: torch.Tensor, right: torch.Tensor) -> float:
    """Dot product of two flat tensors, accurate to a few 1e-7 relative."""
    return sum(float(torch.dot(left[i : i + _CHUNK], right[i : i + _CHUNK])) for i in range(0, left.numel(), _CHUNK))


_L1_ROW = 1 << 14


def chunked_l1(tensor: torch.Tensor) -> float:
    """Sum of absolute values, accurate to a few 1e-7 relative, as mergekit's rescaling needs: one reduction per
    row of _L1_ROW elements (a single multi-threaded call), the row sums added in float64."""
    flat = tensor.reshape(-1)
    whole = flat.numel() - flat.numel() % _L1_ROW
    rows = flat[:whole].view(-1, _L1_ROW)
    total = float(torch.linalg.vector_norm(rows, ord=1, dim=1).double().sum()) if whole else 0.0
    return total + float(torch.linalg.vector_norm(flat[whole:], ord=1))


def combine(inputs: TensorInputs, coefficients: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = sum_j coefficients[j] * basis tensor j; coefficients are scalars [B] or broadcastable [B, ...]."""
    if coefficients.dim() == 1:
        values = [float(c) for c in coefficients]
        terms = [(tensor, value) for tensor, value in zip(inputs.tensors[1:], values[1:], strict=True) if value != 0.0]
        if values[0] == 1.0 and terms:
            first, value = terms.pop(0)
            torch.add(inputs.tensors[0], first, alpha=value, out=out)
        else:
            torch.mul(inputs.tensors[0], values[0], out=out)
        for tensor, value in terms:
            out.add_(tensor, alpha=value)
        return out
    weights = coefficients.to(device=out.device, dtype=torch.float32)
    torch.mul(inputs.tensors[0], weights[0], out=out)
    for tensor, weight in zip(inputs.tensors[1:], weights[1:], strict=True):
        out.addcmul_(tensor, weight)
    return out


def _quadratic(left: torch.Tensor, gram: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    return torch.einsum("i,ij...,j->...", left, gram, right)


# Sparsification: each returns the masked task vector (in a scratch buffer, or the task vector itself when nothing
# is dropped). Magnitude cuts are lookups in the sorted magnitudes computed once per engine.


class Sparsification(StrEnum):
    none = "none"
    magnitude = "magnitude"  # TIES: keep the `density` share of largest magnitudes
    random = "random"  # DARE: keep each element with probability `density`
    breadcrumbs = "breadcrumbs"  # drop the `gamma` share of largest outliers and the smallest, keep `density`
    della = "della"  # DELLA: keep probability grows with magnitude rank within each row


class Consensus(StrEnum):
    none = "none"
    sum = "sum"  # TIES: majority sign of the weighted sum
    count = "count"  # majority of signs


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


def _magnitude(inputs: TensorInputs, model: str, density: float, buffer: int, **_: Any) -> torch.Tensor:
    task_vector = inputs.tensors[inputs.slot(model)]
    if density >= 1:
        return task_vector
    count = max(1, int(density * task_vector.numel()))
    masked = torch.abs(task_vector, out=inputs.scratch(buffer))
    _top_mask(masked, inputs.sorted_magnitudes(model), count, masked)
    return masked.mul_(task_vector)


def _breadcrumbs(inputs: TensorInputs, model: str, density: float, buffer: int, gamma: float, **_: Any) -> torch.Tensor:
    task_vector = inputs.tensors[inputs.slot(model)]
    if density >= 1:
        return task_vector
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


def _random(inputs: TensorInputs, model: str, density: float, buffer: int, **_: Any) -> torch.Tensor:
    task_vector = inputs.tensors[inputs.slot(model)]
    if density >= 1:
        return task_vector
    return inputs.keep_mask(model, density, inputs.scratch(buffer)).mul_(task_vector)


def _della(inputs: TensorInputs, model: str, density: float, buffer: int, epsilon: float, **_: Any) -> torch.Tensor:
    task_vector = inputs.tensors[inputs.slot(model)]
    if density >= 1:
        return task_vector
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


@dataclass(frozen=True)
class TaskArithmetic:
    """One row of the task-arithmetic family: base + lambda * sum_i w_i * sparsify(tau_i) [* sign consensus]
    [/ normalizer]. `role_weights` (MergeAlign) takes each model's weight from a role parameter instead."""

    sparsification: Sparsification = Sparsification.none
    consensus: Consensus = Consensus.none
    normalize: bool = False
    rescale: bool = False
    role_weights: dict[str, str] | None = None

    def params(self) -> tuple[Param, ...]:
        if self.role_weights:
            return tuple(Param(name, float, 1.0, per_model=True) for name in self.role_weights.values())
        params = [
            Param("int8_mask", bool, False),  # mergekit's memory option; the result is the same either way
            Param("normalize", bool, self.normalize),
            Param("rescale", bool, self.rescale),
            Param("lambda", float, 1.0),
            Param("weight", float, None, per_model=True),
            Param("density", float, 1.0, per_model=True),
        ]
        if self.sparsification == Sparsification.breadcrumbs:
            params.append(Param("gamma", float, 0.01, per_model=True))
        if self.sparsification == Sparsification.della:
            params.append(Param("epsilon", float, 0.15, per_model=True))
        return tuple(params)

    def __call__(
        self, inputs: TensorInputs, shared: dict, per_model: dict[str, dict], out: torch.Tensor
    ) -> torch.Tensor:
        weights = {model: values["weight"] for model, values in per_model.items()}
        scale = shared.get("lambda", 1.0)
        normalize = shared.get("normalize", False)
        if self.sparsification == Sparsification.none and self.consensus == Consensus.none:
            total = sum(weights.values())
            divisor = total if normalize and abs(total) >= 1e-8 else 1.0
            # In basis coefficients, so the recipe's base may be any model the engine holds (e.g. the aligned one).
            origin = inputs.origin(shared)
            coefficients = origin.clone()
            for model, weight in weights.items():
                coefficients += scale * weight / divisor * (inputs.vector(model) - origin)
            return combine(inputs, coefficients, out)

        deltas = []  # (masked task vector, weight, rescale factor)
        sparsify = SPARSIFIERS.get(self.sparsification)
        for index, (model, values) in enumerate(per_model.items()):
            if weights[model] == 0:
                continue  # a zero weight never wins a sign vote and adds nothing (as in mergekit)
            task_vector = inputs.tensors[inputs.slot(model)]
            delta = task_vector if sparsify is None else sparsify(inputs, model, buffer=2 * index + 4, **values)
            factor = 1.0
            if shared.get("rescale") and delta is not task_vector:
                before, after = inputs.l1[inputs.slot(model)], chunked_l1(delta)
                factor = before / after if before >= 1e-7 and after >= 1e-7 else 1.0
            deltas.append((delta, weights[model], factor))
        if not deltas:
            return out.copy_(inputs.tensors[0])

        if self.consensus == Consensus.none:
            total = sum(weights.values())
            divisor = total if normalize and abs(total) >= 1e-8 else 1.0
            first, weight, factor = deltas[0]
            torch.add(inputs.tensors[0], first, alpha=scale * weight * factor / divisor, out=out)
            for delta, weight, factor in deltas[1:]:
                out.add_(delta, alpha=scale * weight * factor / divisor)
            return out

        majority = inputs.scratch(0)
        for index, (delta, weight, factor) in enumerate(deltas):
            if self.consensus == Consensus.sum:
                term, value = delta, weight * factor
            else:
                term, value = torch.sign(delta, out=inputs.scratch(1)), math.copysign(1.0, weight)
            if index == 0:
                torch.mul(term, value, out=majority)
            else:
                # Round each weighted term before adding it, as mergekit's stack-and-sum does: a fused
                # multiply-add rounds once and can flip the sign of a vote that is within rounding of zero.
                majority.add_(torch.mul(term, value, out=inputs.scratch(1)))
        # +1 where the vote is >= 0, else -1. copysign reads -0.0 as negative, but a vote of -0.0 only arises when
        # every term is zero, and zero terms never agree with either sign, so the result is mergekit's.
        torch.copysign(torch.ones((), device=majority.device), majority, out=majority)

        mixed, divisor, agrees = inputs.scratch(1), inputs.scratch(2), inputs.scratch(3)
        zero = torch.zeros((), device=mixed.device)
        for index, (delta, weight, factor) in enumerate(deltas):
            torch.mul(delta, majority, out=agrees)
            # sign(weight * delta) == majority: for a negative weight the delta must oppose the majority.
            agrees.gt_(0) if weight > 0 else agrees.lt_(0)
            if index == 0:
                torch.addcmul(zero, delta, agrees, value=weight * factor, out=mixed)
            else:
                mixed.addcmul_(delta, agrees, value=weight * factor)
            if normalize:  # the divisor counts the weights that agree, element by element
                torch.mul(agrees, weight, out=divisor) if index == 0 else divisor.add_(agrees, alpha=weight)
        if normalize:
            if all(weight > 0 for _, weight, _ in deltas):
                divisor.clamp_(min=1e-30)  # zero only where nothing agreed, so mixed is 0 there too
            else:
                divisor[divisor == 0] = 1.0
            mixed.div_(divisor)
        return torch.add(inputs.tensors[0], mixed, alpha=scale, out=out)


def _linear(inputs: TensorInputs, shared: dict, per_model: dict[str, dict], out: torch.Tensor) -> torch.Tensor:
    coefficients = torch.zeros(len(inputs.basis), dtype=torch.float64)
    for model, values in per_model.items():
        coefficients += values["weight"] * inputs.vector(model)
    if shared["normalize"]:
        coefficients /= sum(values["weight"] for values in per_model.values())
    return combine(inputs, coefficients, out)


def _slerp(inputs: TensorInputs, shared: dict, per_model: dict[str, dict], out: torch.Tensor) -> torch.Tensor:
    (model,) = per_model
    start, end = inputs.origin(shared), inputs.vector(model)
    t = shared["t"]
    gram = inputs.gram
    norm_start = math.sqrt(max(float(_quadratic(start, gram, start)), 0.0))
    norm_end = math.sqrt(max(float(_quadratic(end, gram, end)), 0.0))
    norm_start = norm_start if norm_start > 1e-8 else 1.0
    norm_end = norm_end if norm_end > 1e-8 else 1.0
    dot = min(1.0, max(-1.0, float(_quadratic(start, gram, end)) / (norm_start * norm_end)))
    if abs(dot) > 0.9995:  # nearly collinear: mergekit interpolates linearly
        weight_start, weight_end = 1 - t, t
    else:
        theta = math.acos(dot)
        weight_start = math.sin((1 - t) * theta) / math.sin(theta)
        weight_end = math.sin(t * theta) / math.sin(theta)
    return combine(inputs, weight_start * start + weight_end * end, out)


def _nuslerp(inputs: TensorInputs, shared: dict, per_model: dict[str, dict], out: torch.Tensor) -> torch.Tensor:
    (first, first_values), (second, second_values) = per_model.items()
    total = first_values["weight"] + second_values["weight"]
    t = 0.5 if abs(total) < 1e-6 else second_values["weight"] / total
    origin = inputs.origin(shared)
    start, end = inputs.vector(first) - origin, inputs.vector(second) - origin
    dim = None if shared["nuslerp_flatten"] else (0 if shared["nuslerp_row_wise"] else -1)
    gram = inputs.gram_along(dim)
    norm_start = _quadratic(start, gram, start).clamp(min=0).sqrt().clamp(min=1e-7)
    norm_end = _quadratic(end, gram, end).clamp(min=0).sqrt().clamp(min=1e-7)
    cos = (_quadratic(start, gram, end) / (norm_start * norm_end)).clamp(-1, 1)
    collinear = (1 - cos.square()) <= 1e-16
    theta = torch.acos(torch.where(collinear, torch.zeros_like(cos), cos))
    sin_theta = torch.where(collinear, torch.ones_like(theta), torch.sin(theta))
    weight_start = torch.where(collinear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    weight_end = torch.where(collinear, torch.full_like(theta, t), torch.sin(t * theta) / sin_theta)
    coefficients = _outer(start, weight_start) + _outer(end, weight_end) + _outer(origin, torch.ones_like(theta))
    return combine(inputs, coefficients, out)


def _outer(vector: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Basis coefficients [B] times per-row weights [...] -> [B, ...] (or [B] when weights is a scalar)."""
    return vector.reshape(-1, *([1] * weights.dim())) * weights


def _model_stock(inputs: TensorInputs, shared: dict, per_model: dict[str, dict], out: torch.Tensor) -> torch.Tensor:
    models = list(per_model)
    origin = inputs.origin(shared)
    offsets = [inputs.vector(model) - origin for model in models]
    filter_wise = shared["filter_wise"]
    gram = inputs.gram_along(-1 if filter_wise else None)
    cosines = []
    for index, left in enumerate(offsets):
        for right in offsets[index + 1 :]:
            norms = (
                _quadratic(left, gram, left).clamp(min=0).sqrt() * _quadratic(right, gram, right).clamp(min=0).sqrt()
            )
            cosines.append((_quadratic(left, gram, right) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cosine = torch.stack(cosines).mean(dim=0)
    count = len(models)
    denominator = 1 + (count - 1) * cosine
    singular = denominator.abs() < 1e-6  # no finite estimate: keep the base, as mergekit does
    t = torch.where(singular, torch.zeros_like(cosine), count * cosine / torch.where(singular, 1.0, denominator))
    coefficients = _outer(origin, torch.ones_like(t)) + _outer(sum(offsets) / count, t)
    return combine(inputs, coefficients, out)


@dataclass(frozen=True)
class MergeMethod:
    """A named method: its parameters, which inputs it takes, and its kernel."""

    name: str
    params: tuple[Param, ...]
    kernel: Callable[[TensorInputs, dict, dict[str, dict], torch.Tensor], torch.Tensor]
    base: str = "required"  # required | optional | input (linear: the base is one more weighted input)
    min_models: int = 1  # models other than the base
    max_models: int | None = None
    mergekit_name: str = ""
    random: bool = False
    role_weights: dict[str, str] | None = field(default=None)

    def inputs(self, recipe: Recipe) -> list[str]:
        """The models the kernel mixes, in recipe order (the base only where it is a weighted input)."""
        models = [entry.model for entry in recipe.models if entry.model != recipe.base_model or self.base == "input"]
        if self.base == "input" and recipe.base_model is not None and recipe.base_model not in models:
            models.append(recipe.base_model)  # mergekit adds an unlisted base to a linear merge
        return models

    def check_roles(self, recipe: Recipe, source: str) -> None:
        if self.base == "required" and recipe.base_model is None:
            raise UserError(f"{source}: {self.name} needs base_model; add base_model: PATH")
        others = [entry.model for entry in recipe.models if entry.model != recipe.base_model]
        if self.base == "input":
            others = self.inputs(recipe)
        if len(others) < self.min_models or (self.max_models is not None and len(others) > self.max_models):
            wanted = (
                f"exactly {self.min_models}" if self.min_models == self.max_models else f"at least {self.min_models}"
            )
            raise UserError(f"{source}: {self.name} merges {wanted} model(s) besides the base, got {len(others)}")
        if self.role_weights:
            if recipe.alignment_model not in others:
                raise UserError(
                    f"{source}: {self.name} needs alignment_model set to one of the models ({', '.join(others)}); "
                    "its task vector is the alignment vector"
                )
        elif recipe.alignment_model is not None:
            raise UserError(f"{source}: alignment_model applies to mergealign only; remove it for {self.name}")

    def role(self, recipe: Recipe, model: str) -> str:
        return "alignment" if model == recipe.alignment_model else "domain"


def _task_arithmetic_method(name: str, row: TaskArithmetic, mergekit_name: str | None = None) -> MergeMethod:
    min_models = 2 if row.role_weights else 1
    return MergeMethod(
        name=name,
        params=row.params(),
        kernel=row,
        min_models=min_models,
        mergekit_name=mergekit_name or name,
        random=row.sparsification in (Sparsification.random, Sparsification.della),
        role_weights=row.role_weights,
    )


S, C = Sparsification, Consensus
TASK_ARITHMETIC_FAMILY: dict[str, TaskArithmetic] = {
    "task_arithmetic": TaskArithmetic(),
    "ties": TaskArithmetic(S.magnitude, C.sum, normalize=True),
    "dare_ties": TaskArithmetic(S.random, C.sum, rescale=True),
    "dare_linear": TaskArithmetic(S.random, rescale=True),
    "breadcrumbs": TaskArithmetic(S.breadcrumbs),
    "breadcrumbs_ties": TaskArithmetic(S.breadcrumbs, C.sum),
    "della": TaskArithmetic(S.della, C.sum, normalize=True, rescale=True),
    "della_linear": TaskArithmetic(S.della, rescale=True),
    # MergeAlign: base + lambda_domain * domain vectors + lambda_align * alignment vector.
    "mergealign": TaskArithmetic(role_weights={"alignment": "lambda_align", "domain": "lambda_domain"}),
}

METHODS: dict[str, MergeMethod] = {
    name: _task_arithmetic_method(name, row, "task_arithmetic" if name == "mergealign" else None)
    for name, row in TASK_ARITHMETIC_FAMILY.items()
}
METHODS.update(
    linear=MergeMethod(
        "linear",
        (Param("weight", float, None, per_model=True), Param("normalize", bool, True)),
        _linear,
        base="input",
        mergekit_name="linear",
    ),
    slerp=MergeMethod("slerp", (Param("t", float, None),), _slerp, min_models=1, max_models=1, mergekit_name="slerp"),
    nuslerp=MergeMethod(
        "nuslerp",
        (
            Param("weight", float, None, per_model=True),
            Param("nuslerp_row_wise", bool, False),
            Param("nuslerp_flatten", bool, True),
        ),
        _nuslerp,
        base="optional",
        min_models=2,
        max_models=2,
        mergekit_name="nuslerp",
    ),
    model_stock=MergeMethod(
        "model_stock", (Param("filter_wise", bool, False),), _model_stock, min_models=2, mergekit_name="model_stock"
    ),
)
