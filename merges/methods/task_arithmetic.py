"""The one generalized task-arithmetic kernel: base + lambda * sum_i w_i * sparsify(tau_i), with optional sign
consensus and normalization. Each named method (ties, dare_*, breadcrumbs*, della*, mergealign) is a row of it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

import torch

from safemerge.merges.methods import cpu_kernels
from safemerge.merges.methods.inputs import (
    DELLA_DENSITIES,
    DELLA_EPSILON,
    DENSITIES,
    WEIGHTS,
    Param,
    TensorInputs,
    combine,
)
from safemerge.merges.methods.sparsify import RANDOM_MASKS, SPARSIFIERS, Sparsification, sparsified_l1


class Consensus(StrEnum):
    none = "none"
    sum = "sum"  # TIES: majority sign of the weighted sum
    count = "count"  # majority of signs


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
            return tuple(Param(name, float, 1.0, per_model=True, search=WEIGHTS) for name in self.role_weights.values())
        sparsifying = self.sparsification != Sparsification.none
        della = self.sparsification == Sparsification.della
        params = [
            Param("int8_mask", bool, False),  # mergekit's memory option; the result is the same either way
            Param("normalize", bool, self.normalize),
            Param("rescale", bool, self.rescale),
            Param("lambda", float, 1.0),
            Param("weight", float, None, per_model=True, search=WEIGHTS),
            Param(
                "density",
                float,
                1.0,
                per_model=True,
                search=(DELLA_DENSITIES if della else DENSITIES) if sparsifying else None,
            ),
        ]
        if self.sparsification == Sparsification.breadcrumbs:
            params.append(Param("gamma", float, 0.01, per_model=True))
        if della:
            params.append(Param("epsilon", float, DELLA_EPSILON, per_model=True))
        return tuple(params)

    def __call__(
        self, inputs: TensorInputs, shared: dict, per_model: dict[str, dict], out: torch.Tensor
    ) -> torch.Tensor:
        weights = {model: values["weight"] for model, values in per_model.items()}
        scale = shared.get("lambda", 1.0)
        normalize = shared.get("normalize", False)
        total = sum(weights.values())
        normalizer = total if normalize and abs(total) >= 1e-8 else 1.0  # without sign consensus
        if self.sparsification == Sparsification.none and self.consensus == Consensus.none:
            # In basis coefficients, so the recipe's base may be any model the engine holds (e.g. the aligned one).
            origin = inputs.origin(shared)
            coefficients = origin.clone()
            for model, weight in weights.items():
                coefficients += scale * weight / normalizer * (inputs.vector(model) - origin)
            return combine(inputs, coefficients, out)

        deltas = []  # (masked task vector, weight, rescale factor)
        sparsify = SPARSIFIERS.get(self.sparsification)
        for index, (model, values) in enumerate(per_model.items()):
            if weights[model] == 0:
                continue  # a zero weight never wins a sign vote and adds nothing (as in mergekit)
            task_vector, factor = inputs.tensors[inputs.slot(model)], 1.0
            if sparsify is None or values["density"] >= 1:
                delta = task_vector
            else:
                rescale = shared.get("rescale")

                def sparsified(chunk: TensorInputs, model=model, values=values, index=index) -> float:
                    return sparsified_l1(chunk, model, self.sparsification, buffer=2 * index + 4, **values)

                # Random masks of a tensor in chunks: the whole-tensor norm pass first, as it records the masks that
                # this chunk's sparsify then reads rather than drawing again. (Magnitude cuts go the other way: the
                # chunk's sparsify selects the cuts, which the norm pass then reuses.)
                drawn = rescale and not inputs.whole and self.sparsification in RANDOM_MASKS
                after = inputs.sparsified_l1(model, sparsified) if drawn else None
                sparse = sparsify(inputs, model, task_vector, buffer=2 * index + 4, **values)
                delta = sparse.delta
                if rescale:
                    if after is None:
                        after = sparse.norm() if inputs.whole else inputs.sparsified_l1(model, sparsified)
                    before = inputs.l1[inputs.slot(model)]
                    factor = before / after if before >= 1e-7 and after >= 1e-7 else 1.0
            deltas.append((delta, weights[model], factor))
        if not deltas:
            return out.copy_(inputs.tensors[0])

        if self.consensus == Consensus.none:
            first, weight, factor = deltas[0]
            torch.add(inputs.tensors[0], first, alpha=scale * weight * factor / normalizer, out=out)
            for delta, weight, factor in deltas[1:]:
                out.add_(delta, alpha=scale * weight * factor / normalizer)
            return out

        if _fusable(inputs.tensors[0], [delta for delta, _, _ in deltas], out):
            flat = cpu_kernels.flat
            cpu_kernels.elect(
                flat(inputs.tensors[0]),
                [flat(delta) for delta, _, _ in deltas],
                [weight * factor for _, weight, factor in deltas],
                [weight for _, weight, _ in deltas],
                scale,
                self.consensus == Consensus.count,
                normalize,
                flat(out),
            )
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


def _fusable(base: torch.Tensor, deltas: list[torch.Tensor], out: torch.Tensor) -> bool:
    """Whether the sign election runs as one compiled pass (merges/methods/cpu_kernels.py): at most its number of
    task vectors, which the compiled loops take; elsewhere (a GPU) the torch ops below run it."""
    return cpu_kernels.fusable(deltas, base, out)
