"""The kernels that mix whole models rather than masked task vectors: linear, slerp, nuslerp, model_stock, karcher
and multislerp, each computed as basis coefficients from the engine's dot products and applied in one linear
combination."""

from __future__ import annotations

import math

import torch

from safemerge.errors import UserError
from safemerge.merges.methods.inputs import TensorInputs, combine


def _quadratic(left: torch.Tensor, gram: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    return torch.einsum("i,ij...,j->...", left, gram, right)


def _norm(vector: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """The length of the tensor that basis coefficients `vector` stand for (per row when `gram` is per row)."""
    return _quadratic(vector, gram, vector).clamp(min=0).sqrt()


def _outer(vector: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Basis coefficients [B] times per-row weights [...] -> [B, ...] (or [B] when weights is a scalar)."""
    return vector.reshape(-1, *([1] * weights.dim())) * weights


def linear(inputs: TensorInputs, shared: dict, per_model: dict[str, dict], out: torch.Tensor) -> torch.Tensor:
    coefficients = torch.zeros(len(inputs.basis), dtype=torch.float64)
    for model, values in per_model.items():
        coefficients += values["weight"] * inputs.vector(model)
    if shared["normalize"]:
        coefficients /= sum(values["weight"] for values in per_model.values())
    return combine(inputs, coefficients, out)


def slerp(inputs: TensorInputs, shared: dict, per_model: dict[str, dict], out: torch.Tensor) -> torch.Tensor:
    (model,) = per_model
    start, end = inputs.origin(shared), inputs.vector(model)
    t = shared["t"]
    gram = inputs.gram
    norm_start = float(_norm(start, gram))
    norm_end = float(_norm(end, gram))
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


def nuslerp(inputs: TensorInputs, shared: dict, per_model: dict[str, dict], out: torch.Tensor) -> torch.Tensor:
    (first, first_values), (second, second_values) = per_model.items()
    total = first_values["weight"] + second_values["weight"]
    t = 0.5 if abs(total) < 1e-6 else second_values["weight"] / total
    origin = inputs.origin(shared)
    start, end = inputs.vector(first) - origin, inputs.vector(second) - origin
    dim = None if shared["nuslerp_flatten"] else (0 if shared["nuslerp_row_wise"] else -1)
    gram = inputs.gram_along(dim)
    norm_start = _norm(start, gram).clamp(min=1e-7)
    norm_end = _norm(end, gram).clamp(min=1e-7)
    cos = (_quadratic(start, gram, end) / (norm_start * norm_end)).clamp(-1, 1)
    collinear = (1 - cos.square()) <= 1e-16
    theta = torch.acos(torch.where(collinear, torch.zeros_like(cos), cos))
    sin_theta = torch.where(collinear, torch.ones_like(theta), torch.sin(theta))
    weight_start = torch.where(collinear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    weight_end = torch.where(collinear, torch.full_like(theta, t), torch.sin(t * theta) / sin_theta)
    coefficients = _outer(start, weight_start) + _outer(end, weight_end) + _outer(origin, torch.ones_like(theta))
    return combine(inputs, coefficients, out)


def model_stock(inputs: TensorInputs, shared: dict, per_model: dict[str, dict], out: torch.Tensor) -> torch.Tensor:
    models = list(per_model)
    origin = inputs.origin(shared)
    offsets = [inputs.vector(model) - origin for model in models]
    filter_wise = shared["filter_wise"]
    gram = inputs.gram_along(-1 if filter_wise else None)
    cosines = []
    for index, left in enumerate(offsets):
        for right in offsets[index + 1 :]:
            norms = _norm(left, gram) * _norm(right, gram)
            cosines.append((_quadratic(left, gram, right) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cosine = torch.stack(cosines).mean(dim=0)
    count = len(models)
    denominator = 1 + (count - 1) * cosine
    singular = denominator.abs() < 1e-6  # no finite estimate: keep the base, as mergekit does
    t = torch.where(singular, torch.zeros_like(cosine), count * cosine / torch.where(singular, 1.0, denominator))
    coefficients = _outer(origin, torch.ones_like(t)) + _outer(sum(offsets) / count, t)
    return combine(inputs, coefficients, out)


def karcher(inputs: TensorInputs, shared: dict, per_model: dict[str, dict], out: torch.Tensor) -> torch.Tensor:
    """The Karcher (Riemannian) mean of the models' directions on the unit sphere, scaled by their mean norm, by
    mergekit's iteration; every step is a combination of the models, so it runs on basis coefficients."""
    vectors = [inputs.vector(model) for model in per_model]
    if len(vectors) == 1:
        return combine(inputs, vectors[0], out)
    gram, tol = inputs.gram, shared["tol"]
    norms = [float(_norm(vector, gram)) for vector in vectors]
    alphas = [1.0 / len(vectors)] * len(vectors)
    units = [
        vector / norm if norm != 0.0 else torch.zeros_like(vector) for vector, norm in zip(vectors, norms, strict=True)
    ]
    valid = [index for index, norm in enumerate(norms) if norm > tol]
    if not valid:
        return out.zero_()
    alpha_sum = sum(alphas[index] for index in valid)
    weighted = [(alphas[index] / alpha_sum, units[index]) for index in valid]
    mean = sum(alpha * unit for alpha, unit in weighted)
    mean_norm = float(_norm(mean, gram))
    mean = weighted[0][1].clone() if mean_norm < tol else mean / mean_norm
    for _ in range(int(shared["max_iter"])):
        tangent = torch.zeros_like(mean)
        for alpha, unit in weighted:
            dot = min(1.0, max(-1.0, float(_quadratic(mean, gram, unit))))
            theta = math.acos(dot)
            if theta < tol:
                continue
            tangent += alpha * (theta / math.sin(theta)) * (unit - dot * mean)
        tangent_norm = float(_norm(tangent, gram))
        if tangent_norm < tol:
            break
        mean = math.cos(tangent_norm) * mean + math.sin(tangent_norm) * (tangent / tangent_norm)
        unit_norm = float(_norm(mean, gram))
        if unit_norm > tol:
            mean = mean / unit_norm
    scale = sum(alpha * norm for alpha, norm in zip(alphas, norms, strict=True))
    return combine(inputs, scale * mean, out)


def multislerp(inputs: TensorInputs, shared: dict, per_model: dict[str, dict], out: torch.Tensor) -> torch.Tensor:
    """Barycentric interpolation on the sphere (mergekit's multislerp): the models' offsets from the base (or the
    models themselves without one) projected to the tangent space at their weighted mean direction, averaged there,
    mapped back and scaled by their weighted mean norm; on basis coefficients, as slerp."""
    models = list(per_model)
    if len(models) == 1:
        return combine(inputs, inputs.vector(models[0]), out)
    gram, eps = inputs.gram, shared["eps"]
    origin = inputs.origin(shared)
    offsets = [inputs.vector(model) - origin for model in models]
    weights = [per_model[model]["weight"] for model in models]
    if shared["normalize_weights"]:
        total = sum(weights)
        weights = [weight / total for weight in weights]
    norms = [float(_norm(offset, gram)) for offset in offsets]
    units = [offset / (norm + eps) for offset, norm in zip(offsets, norms, strict=True)]
    mean = sum(weight * unit for weight, unit in zip(weights, units, strict=True))
    mean_norm = float(_norm(mean, gram))
    if mean_norm < eps:
        if len(models) == 2:  # mergekit falls back to linear interpolation
            return combine(inputs, weights[0] * offsets[0] + weights[1] * offsets[1] + origin, out)
        raise UserError(
            f"multislerp: the weighted mean direction of tensor {inputs.name} is zero (antipodal models whose "
            "weights cancel); change the weights"
        )
    mean = mean / mean_norm
    tangents = [unit - float(_quadratic(unit, gram, mean)) * mean for unit in units]
    tangent = sum(weight * vector for weight, vector in zip(weights, tangents, strict=True))
    tangent_norm = float(_norm(tangent, gram)) + eps
    result = mean * math.cos(tangent_norm) + tangent * (math.sin(tangent_norm) / tangent_norm)
    average_norm = sum(norm * weight for norm, weight in zip(norms, weights, strict=True))
    return combine(inputs, result * average_norm + origin, out)
