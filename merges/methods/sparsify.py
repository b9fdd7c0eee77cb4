"""Sparsification of task vectors (TIES magnitude, DARE random, breadcrumbs, DELLA), one function per kind in
SPARSIFIERS. Magnitude cuts are exact selections over the whole tensor (merges/methods/selection.py), della's
ranks are computed per chunk: nothing per element is kept between merges."""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from typing import Any, NamedTuple

import torch

from safemerge.merges.methods import cpu_kernels
from safemerge.merges.methods.inputs import TensorInputs, chunked_l1

# Each sparsifier returns the masked task vector in a scratch buffer. It is called only for density < 1: at
# density 1 nothing is dropped and the caller keeps the task vector itself.


class Sparsified(NamedTuple):
    """A sparsifier's result for one chunk: the masked task vector, in a scratch buffer, and its L1 norm where the
    compiled loop that wrote it summed that on the way (None: norm() takes a pass over it)."""

    delta: torch.Tensor
    l1: float | None = None

    def norm(self) -> float:
        """This chunk's L1 norm."""
        return self.l1 if self.l1 is not None else chunked_l1(self.delta)


class Sparsification(StrEnum):
    none = "none"
    magnitude = "magnitude"  # TIES: keep the `density` share of largest magnitudes
    random = "random"  # DARE: keep each element with probability `density`
    breadcrumbs = "breadcrumbs"  # drop the `gamma` share of largest outliers and the smallest, keep `density`
    della = "della"  # DELLA: keep probability grows with magnitude rank within each row


# The sparsifications that draw a random mask, which a rescale's norm pass over a tensor in chunks records for the
# merge pass (rather than drawing it twice).
RANDOM_MASKS = frozenset({Sparsification.random, Sparsification.della})


def _magnitude(
    inputs: TensorInputs, model: str, task_vector: torch.Tensor, density: float, buffer: int, **_: Any
) -> Sparsified:
    count = max(1, int(density * inputs.numel))
    out = inputs.scratch(buffer)
    (cut,) = inputs.top_cuts(model, [count], _magnitudes_if_whole(inputs, task_vector, out))
    return Sparsified(cut.sparsify(task_vector, inputs.start, out=out))


def _magnitudes_if_whole(inputs: TensorInputs, task_vector: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """|task vector| in `out` where the chunk is the whole tensor (its cut is selected from them); a tensor in
    several chunks takes its cuts from a pass of its own, so `out` is left as it is."""
    return torch.abs(task_vector, out=out) if inputs.whole else out


def _breadcrumbs(
    inputs: TensorInputs, model: str, task_vector: torch.Tensor, density: float, buffer: int, gamma: float, **_: Any
) -> Sparsified:
    total = inputs.numel
    keep = int(density * total)
    outliers = int(gamma * total)
    smallest = max(0, total - keep - outliers)
    magnitudes = _magnitudes_if_whole(inputs, task_vector, inputs.scratch(buffer))
    # Keep ascending ranks [smallest, smallest + keep): the top (total - smallest) minus the top outliers.
    kept, dropped = inputs.top_cuts(model, [total - smallest, total - smallest - keep], magnitudes)
    if inputs.whole and (kept.straddles or dropped.straddles):
        # A magnitude tie straddles a cut (rare): which tied element stays is the order of mergekit's ascending
        # torch.sort, which no threshold reproduces, so take that sort here. (A tensor seen in chunks keeps the
        # earliest tied elements instead: a sort of the whole tensor is what the chunks avoid.)
        order = torch.sort(magnitudes.reshape(-1), descending=False).indices
        mask = magnitudes.zero_()
        mask.view(-1)[order[smallest : smallest + keep]] = 1.0
        return Sparsified(mask.mul_(task_vector))
    # The kept share minus the outliers (a subset of it): exact, each element is x - x, x - 0 or 0 - 0.
    outliers = dropped.sparsify(task_vector, inputs.start, out=inputs.scratch(buffer + 1))
    return Sparsified(kept.sparsify(task_vector, inputs.start, out=magnitudes).sub_(outliers))


def _random(
    inputs: TensorInputs, model: str, task_vector: torch.Tensor, density: float, buffer: int, **_: Any
) -> Sparsified:
    out = inputs.scratch(buffer)
    if cpu_kernels.compiled(task_vector, out):  # one compiled pass, drawn again (not recorded) where needed twice
        flat = cpu_kernels.flat
        return Sparsified(
            out, cpu_kernels.keep_values(flat(task_vector), density, inputs.stream(model), inputs.start, flat(out))
        )
    draw = lambda mask: inputs.keep_mask(model, density, mask)  # noqa: E731
    return Sparsified(inputs.random_mask(model, draw, out).mul_(task_vector))


def _della(
    inputs: TensorInputs, model: str, task_vector: torch.Tensor, density: float, buffer: int, epsilon: float, **_: Any
) -> Sparsified:
    out, rows = inputs.scratch(buffer), _rows(task_vector)
    if cpu_kernels.compiled(task_vector, out):  # mask, kept values and their norm in one pass
        recorded = inputs.recorded_mask(model)
        if recorded is not None:  # the rescale's pass drew this chunk's mask: its bits times the task vector
            cpu_kernels.unpack_product(cpu_kernels.flat(task_vector), recorded.numpy(), cpu_kernels.flat(out))
            return Sparsified(out)
        seed, into = inputs.stream(model), out.view(rows.shape).numpy()
        return Sparsified(out, cpu_kernels.della_keep(rows.numpy(), density, epsilon, seed, inputs.start, into))

    def draw(mask: torch.Tensor) -> torch.Tensor:
        keys = inputs.scratch(0, torch.int64).view(rows.shape)  # int64: 2 fp32 buffers' worth
        probability = _rank_norm(torch.abs(rows, out=inputs.scratch(buffer + 1).view(rows.shape)), keys)
        probability.mul_(2 * epsilon).add_(density - epsilon)
        return torch.lt(inputs.fill_uniform(model, mask), probability.view(mask.shape), out=mask)

    return Sparsified(inputs.random_mask(model, draw, out).mul_(task_vector))


def sparsified_l1(
    inputs: TensorInputs, model: str, sparsification: Sparsification, buffer: int, **values: Any
) -> float:
    """The L1 norm of this chunk's sparsified task vector (its rescale's pass over a tensor in chunks): on the CPU,
    DARE's and della's in one compiled pass over the model and the base that writes no task vector (DARE's writes
    nothing, della's its mask's bits, recorded for the merge pass, as ranking draws costs more than reading bits),
    the others from the sparsifier's result."""
    arrays = inputs.compiled_arrays([model], buffer) if sparsification in RANDOM_MASKS else None
    if arrays is not None and sparsification == Sparsification.random:
        (own,), base = arrays
        return cpu_kernels.kept_l1(own, base, values["density"], inputs.stream(model), inputs.start)
    if arrays is not None:  # della: the mask's bits, recorded for the merge pass, and the kept values' norm
        (own,), base = arrays
        shape = _rows(inputs.tensors[0]).shape
        density, epsilon, seed = values["density"], values["epsilon"], inputs.stream(model)
        packed, l1 = cpu_kernels.della_kept_bits(
            own.reshape(shape), base.reshape(shape), density, epsilon, seed, inputs.start
        )
        inputs.record_mask(model, torch.from_numpy(packed))
        return l1
    task_vector = inputs.task_vector(model)
    return SPARSIFIERS[sparsification](inputs, model, task_vector, buffer=buffer, **values).norm()


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    """della's rows: dim 0's rows of a matrix, a vector as one row."""
    return tensor.reshape(1, -1) if tensor.dim() < 2 else tensor


def _rank_norm(magnitudes: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """della's magnitude rank of each element within its row, scaled to [0, 1], written over `magnitudes` (rows
    of |x|), with `keys` (int64, the same shape) as scratch: computed per chunk (a chunk holds whole rows) rather
    than kept, as a table of ranks would cost more memory than the model. The GPU's path, and the definition the
    CPU's compiled cpu_kernels.della_keep is tested against.

    Ranks come from one sort of int64 keys, |x|'s float32 bits (ordered as the magnitudes are, for |x| >= 0) above
    the column: tied magnitudes rank by column, the same on every device and sort algorithm (mergekit's
    torch.argsort leaves ties in its unstable order), and sorting plain integers is faster than an argsort."""
    columns = magnitudes.shape[1]
    keys.copy_(magnitudes.view(torch.int32))
    keys.bitwise_left_shift_(32).bitwise_or_(torch.arange(columns, dtype=torch.int64, device=magnitudes.device))
    order = torch.sort(keys, dim=1).values.bitwise_and_(0xFFFFFFFF)  # the column of each ascending position
    positions = torch.arange(columns, dtype=torch.float32, device=magnitudes.device).expand_as(magnitudes)
    magnitudes.scatter_(1, order, positions)  # the inverse permutation: the rank of each element
    return magnitudes.div_(max(columns - 1, 1))


SPARSIFIERS: dict[Sparsification, Callable[..., Sparsified]] = {
    Sparsification.magnitude: _magnitude,
    Sparsification.random: _random,
    Sparsification.breadcrumbs: _breadcrumbs,
    Sparsification.della: _della,
}
