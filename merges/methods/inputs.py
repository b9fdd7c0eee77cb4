"""What every merge kernel works on: method parameters (Param), one tensor's inputs over a basis of base and task
vectors (TensorInputs), their linear combination, and the chunked reductions that keep fp32 sums accurate."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from safemerge.merges.methods import cpu_kernels
from safemerge.merges.methods.selection import TopCut


@dataclass(frozen=True)
class SearchRange:
    """Where a search draws a parameter from: [low, high], per layer group and module filter (`layered`, a
    gradient) or as one number, and its value in the method's standard recipe (the search's warm start)."""

    low: float
    high: float
    standard: float
    layered: bool = True


# The ranges several methods share: a model's weight (a gradient), a sparsifier's kept share (one per model).
WEIGHTS = SearchRange(0.0, 1.5, standard=1.0)
DENSITIES = SearchRange(0.1, 1.0, standard=0.5, layered=False)
# della draws each element's keep probability within density +/- epsilon, which must stay inside (0, 1): its
# searched densities keep a margin of 0.05 from either end at mergekit's default epsilon.
DELLA_EPSILON = 0.15
DELLA_DENSITIES = SearchRange(DELLA_EPSILON + 0.05, 1.0 - DELLA_EPSILON - 0.05, standard=0.5, layered=False)
INTERPOLATION = SearchRange(0.0, 1.0, standard=0.5)


@dataclass(frozen=True)
class Param:
    """A method parameter: shared by all models of a tensor, or one value per model (per_model); `search`, where
    set, is the range a search draws it from (otherwise it keeps its default)."""

    name: str
    kind: type
    default: Any = None  # None: required
    per_model: bool = False
    search: SearchRange | None = None


class TensorStatistics(Protocol):
    """Whole-tensor figures a kernel working on one chunk may need, computed once per tensor and merge."""

    def top_cuts(self, model: str, counts: Sequence[int], magnitudes: torch.Tensor) -> list[TopCut]: ...

    def sparsified_l1(self, model: str, chunk_l1: Callable[[TensorInputs], float]) -> float: ...

    def gram_along(self, dim: int) -> torch.Tensor: ...

    def random_mask(
        self, model: str, start: int, draw: Callable[[torch.Tensor], torch.Tensor], buffer: torch.Tensor
    ) -> torch.Tensor: ...

    def recorded_mask(self, model: str, start: int) -> torch.Tensor | None: ...

    def record_mask(self, model: str, start: int, packed: torch.Tensor) -> None: ...

    def whole_sum(self, key: str, compute: Callable[[TensorInputs], torch.Tensor]) -> torch.Tensor: ...

    def cuts(
        self,
        key: str,
        counts: Sequence[int],
        compute: Callable[[TensorInputs], torch.Tensor],
        values: torch.Tensor,
        lasting: bool = False,
        sampled: str | None = None,
    ) -> list[TopCut]: ...

    def lasting(self, key: str, start: int, compute: Callable[[], torch.Tensor]) -> torch.Tensor: ...


@dataclass
class TensorInputs:
    """What a kernel sees for one chunk of one tensor: a block of whole rows (dim 0), or the whole tensor.

    Models are vectors over a basis: slot 0 is the engine's reference (base) tensor, slot j > 0 is the task vector
    of `basis[j]`, both fp32 for this chunk only; `gram` (their dot products, float64) and `l1` are whole-tensor
    figures the engine keeps, and `statistics` computes the recipe-dependent ones (cuts, rescale norms)."""

    name: str
    basis: list[str]  # basis[0] is the reference model
    tensors: list[torch.Tensor]  # this chunk, fp32, same order as basis
    gram: torch.Tensor
    l1: list[float]  # L1 norm of each basis tensor, whole tensor
    start: int  # flat offset of this chunk in the tensor
    numel: int  # elements of the whole tensor
    whole: bool  # this chunk is the whole tensor
    statistics: TensorStatistics
    fill_uniform: Callable[[str, torch.Tensor], torch.Tensor]  # U[0, 1) seeded by (recipe seed, tensor, model)
    keep_mask: Callable[[str, float, torch.Tensor], torch.Tensor]  # 1.0 with probability p, same seeding
    stream: Callable[[str], int]  # the seed of those draws' stream, for the compiled CPU loops that draw them
    scratch: Callable[..., torch.Tensor]  # scratch(index[, dtype]): reusable buffers shaped like this chunk
    read: Callable[[str, torch.Tensor], torch.Tensor]  # read(model, buffer): the model's own chunk, in fp32
    # The model's task vector of this chunk, tensors[slot]: computed on first use where the chunk came without it
    # (a whole-tensor pass over the base alone, whose kernel may read the models instead).
    task_vector: Callable[[str], torch.Tensor]

    def top_cuts(self, model: str, counts: Sequence[int], magnitudes: torch.Tensor) -> list[TopCut]:
        """The `count` largest |task vector| elements of the whole tensor, for each count (one selection serves
        them all); `magnitudes` is this chunk's."""
        return self.statistics.top_cuts(model, counts, magnitudes)

    def random_mask(
        self, model: str, draw: Callable[[torch.Tensor], torch.Tensor], buffer: torch.Tensor
    ) -> torch.Tensor:
        """The 0/1 mask `draw` writes into `buffer` for this chunk: drawn once per merge, as a tensor merged in
        several chunks with rescaling needs it twice (its L1 pass, then its merge pass)."""
        return draw(buffer) if self.whole else self.statistics.random_mask(model, self.start, draw, buffer)

    def recorded_mask(self, model: str) -> torch.Tensor | None:
        """This chunk's mask as bits (pack_mask's), where the whole-tensor pass before the merge pass recorded it
        (a compiled loop that writes bits, see record_mask); taken once. None: draw it."""
        return None if self.whole else self.statistics.recorded_mask(model, self.start)

    def record_mask(self, model: str, packed: torch.Tensor) -> None:
        """Keep this chunk's mask as bits (np.packbits' little bit order) for the merge pass, where a whole-tensor
        pass is drawing the masks (a rescale's norm); elsewhere nothing is kept."""
        if not self.whole:
            self.statistics.record_mask(model, self.start, packed)

    def sparsified_l1(self, model: str, chunk_l1: Callable[[TensorInputs], float]) -> float:
        """L1 norm over the whole tensor of a sparsified task vector, for a tensor in several chunks (a whole tensor's
        is its sparsified chunk's own): the sum of chunk_l1(chunk), each chunk's, once per merge, in a pass that
        records the random masks it draws for the merge pass (so take it before sparsifying this chunk)."""
        if self.whole:
            raise ValueError(f"{self.name} is merged whole: its sparsified norm is its own chunk's (Sparsified.norm)")
        return self.statistics.sparsified_l1(model, chunk_l1)

    def whole_sum(
        self, key: str, compute: Callable[[TensorInputs], torch.Tensor], lasting: bool = False
    ) -> torch.Tensor:
        """compute(chunk) summed over the whole tensor's chunks, in float64 on the CPU: a recipe-dependent figure
        (a count, a sum of squares) computed once per tensor and merge under `key`; `lasting`: once per tensor for
        as long as the engine lives, for a figure of the models' weights alone (`key` then names every model it
        depends on). compute's scratch buffers must not be ones the caller still holds."""
        if lasting:
            return self.statistics.lasting(key, -1, lambda: self.whole_sum(key, compute))
        return compute(self).double().cpu() if self.whole else self.statistics.whole_sum(key, compute)

    def cuts(
        self,
        key: str,
        counts: Sequence[int],
        compute: Callable[[TensorInputs], torch.Tensor],
        values: torch.Tensor,
        lasting: bool = False,
        sampled: str | None = None,
    ) -> list[TopCut]:
        """For each count, the `count` largest over the whole tensor of the non-negative values compute(chunk) gives
        (`values`: this chunk's, computed by the caller), once per tensor and merge under `key`; `lasting`: once per
        tensor for as long as the engine lives, for values that depend on the models' weights alone, never on the
        recipe (`key` then names every model they depend on). `sampled`, for such values cut at counts a recipe
        decides: a strided sample of the values is kept under this key (naming every model) for as long as the
        engine lives, so that every later merge finds its cuts in one pass over the chunks."""
        return self.statistics.cuts(key, counts, compute, values, lasting, sampled)

    def lasting(self, key: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """compute() for this chunk, kept by the engine for as long as it lives: for a few figures per row at most,
        that depend on the models' weights alone, never on the recipe (`key` names every model they depend on)."""
        return self.statistics.lasting(key, self.start, compute)

    def compiled_arrays(self, models: Sequence[str], buffer: int) -> tuple[list[np.ndarray], np.ndarray] | None:
        """The models' own chunks (read into scratch buffers buffer, buffer + 1, ... where not held in fp32) and the
        base's, as flat float32 arrays for a compiled loop that takes each task vector as model - base while it runs,
        so a whole-tensor pass writes none; None where the compiled loops do not take them (a GPU, more than
        cpu_kernels.FUSED_VECTORS models)."""
        base = self.tensors[0]
        if len(models) > cpu_kernels.FUSED_VECTORS or not cpu_kernels.compiled(base):
            return None
        own = [self.read(model, self.scratch(buffer + index)) for index, model in enumerate(models)]
        if not cpu_kernels.compiled(*own):
            return None
        return [cpu_kernels.flat(tensor) for tensor in own], cpu_kernels.flat(base)

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
        """Dot products of basis tensors over all elements (dim None) or along one dim (kept for broadcasting),
        shaped to broadcast against this chunk."""
        if dim is None:
            return self.gram
        dim = dim % self.tensors[0].dim()
        if dim == 0 and not self.whole:  # a sum over rows spans every chunk
            return self.statistics.gram_along(dim)
        return chunk_gram_along(self.tensors, dim)


def chunk_gram_along(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
    """[B, B, ...] dot products of the basis tensors along `dim`, in float64, on the CPU (coefficients are)."""
    size = len(tensors)
    rows = [
        [(tensors[i].double() * tensors[j].double()).sum(dim, keepdim=True) for j in range(size)] for i in range(size)
    ]
    return torch.stack([torch.stack(row) for row in rows]).cpu()


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
