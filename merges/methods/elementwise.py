"""The kernels that decide element by element from the models' values rather than mix whole tensors: nearswap,
arcee_fusion, RAM (ram, ramplus_tl) and SCE, each as mergekit computes it. Where one needs a figure of the whole
tensor (RAM+'s per-model counts, SCE's variance cut and weights, arcee_fusion's quantiles) it takes it from the
engine once per tensor and merge (TensorInputs.whole_sum, TensorInputs.cut), so a tensor merged in row chunks
gets the same result as one merged whole."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from safemerge.merges.methods import cpu_kernels
from safemerge.merges.methods.inputs import TensorInputs
from safemerge.merges.methods.selection import ascending_values

# Scratch buffers of whole-tensor passes, above any a kernel holds while it asks for them.
_SIDE = 40


def _task_vectors(inputs: TensorInputs, models: list[str]) -> list[torch.Tensor]:
    """The models' task vectors of this chunk, against the engine's base."""
    return [inputs.task_vector(model) for model in models]


def _stacked_task_vectors(inputs: TensorInputs, models: list[str]) -> torch.Tensor:
    """[models, *chunk] task vectors, as mergekit stacks them."""
    return torch.stack(_task_vectors(inputs, models))


def nearswap(inputs: TensorInputs, shared: dict, per_model: dict[str, dict], out: torch.Tensor) -> torch.Tensor:
    """Take the other model's value where it is within `t` of the base's, and move toward it by t/|a - b|
    elsewhere: weight = clamp(t / |a - b|, 0, 1), result = weight * b + (1 - weight) * a."""
    (model,) = per_model
    base = inputs.read(shared["base_model"], inputs.scratch(0))
    other = inputs.read(model, inputs.scratch(1))
    weight = torch.sub(base, other, out=inputs.scratch(2)).abs_().clamp_(min=1e-6)
    weight.reciprocal_().mul_(shared["t"]).clamp_(0, 1)
    torch.mul(weight, other, out=out)
    return out.add_(weight.neg_().add_(1).mul_(base))


def _divergence(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """The KL divergence of the rows' softmaxes (a row: the last dim), one value per row, as mergekit computes it."""
    eps = 1e-8
    p = F.softmax(other, dim=-1) + eps
    q = F.softmax(base, dim=-1) + eps
    return torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def _importance(inputs: TensorInputs, base_model: str, model: str, non_negative: bool = False) -> torch.Tensor:
    """arcee_fusion's importance: |b - a| times the KL divergence of the rows' softmaxes. The divergences (a float
    per row, of the two models' weights alone) are computed once for as long as the engine lives."""
    base = inputs.read(base_model, inputs.scratch(_SIDE))
    other = inputs.read(model, inputs.scratch(_SIDE + 1))
    divergence = inputs.lasting(f"arcee_fusion.divergence/{base_model}/{model}", lambda: _divergence(base, other))
    importance = (other - base).abs_().mul_(divergence)
    return importance.clamp_(min=0) if non_negative else importance


_QUARTILES = (0.25, 0.5, 0.75)


def arcee_fusion(inputs: TensorInputs, shared: dict, per_model: dict[str, dict], out: torch.Tensor) -> torch.Tensor:
    """Keep the expert's change where its importance is at least median + 1.5 IQR of the tensor's importances.

    The quartiles are exact (the sorted importances at floor(q * (n - 1)), as mergekit indexes them), from one
    selection of all three. mergekit estimates them from a random sample of 10^6 elements for larger tensors, so
    the two agree up to 10^6 elements per tensor."""
    (model,) = per_model
    base_model = shared["base_model"]
    importance = _importance(inputs, base_model, model)
    positions = (torch.tensor(_QUARTILES) * (inputs.numel - 1)).long().tolist()
    if inputs.whole and (min(positions) == 0 or float(importance.min()) < 0):  # a tiny tensor, or a negative KL
        q1, median, q3 = (torch.tensor(value) for value in ascending_values(importance, positions))
    else:  # the (n - i)-th largest is the i-th smallest; a tiny negative KL (rounding) counts as 0 in chunks
        compute = lambda chunk: _importance(chunk, base_model, model, True)  # noqa: E731
        counts = [inputs.numel - position for position in positions]
        values = importance if inputs.whole else importance.clamp(min=0)
        # The importances depend on the two models' weights alone: their quartiles serve every later merge.
        cuts = inputs.cuts(f"arcee_fusion/{base_model}/{model}", counts, compute, values, lasting=True)
        q1, median, q3 = (torch.tensor(cut.value) for cut in cuts)
    threshold = median + 1.5 * (q3 - q1)
    keep = importance.ge_(threshold)
    base = inputs.read(base_model, inputs.scratch(0))
    other = inputs.read(model, inputs.scratch(1))
    change = torch.sub(other, base, out=inputs.scratch(2)).mul_(keep)
    return torch.add(base, change, out=out)


def _ram_masks(task_vectors: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, ...]:
    nonzero = task_vectors.abs() > epsilon
    counts = nonzero.sum(dim=0, keepdim=True)
    return nonzero, counts, counts > 1, counts == 1


def ram(inputs: TensorInputs, shared: dict, per_model: dict[str, dict], out: torch.Tensor) -> torch.Tensor:
    """Reinforced Agent Merging: an element changed (|tau| > epsilon) by one model keeps that change; one changed by
    several takes their mean change."""
    models = list(per_model)
    if _ram_compiled(inputs, models, out):
        return _ram_in_one_pass(inputs, models, [1.0] * len(models), shared["epsilon"], out)
    task_vectors = _stacked_task_vectors(inputs, models)
    nonzero, counts, overlap, unique = _ram_masks(task_vectors, shared["epsilon"])
    changed = task_vectors * nonzero
    merged = (changed * unique + changed * overlap / counts.clamp(min=1)).sum(dim=0)
    return torch.add(inputs.tensors[0], merged, out=out)


def _ram_compiled(inputs: TensorInputs, models: list[str], out: torch.Tensor) -> bool:
    return cpu_kernels.fusable(_task_vectors(inputs, models), inputs.tensors[0], out)


def _ram_in_one_pass(
    inputs: TensorInputs, models: list[str], scales: list[float], epsilon: float, out: torch.Tensor
) -> torch.Tensor:
    flat = cpu_kernels.flat
    vectors = [flat(vector) for vector in _task_vectors(inputs, models)]
    cpu_kernels.ram(flat(inputs.tensors[0]), vectors, scales, epsilon, flat(out))
    return out


def ramplus_tl(inputs: TensorInputs, shared: dict, per_model: dict[str, dict], out: torch.Tensor) -> torch.Tensor:
    """RAM+ (tensor-local): a model's unique changes are scaled by 1 + r * clamp(rho, 0, alpha), rho being its
    shared / unique changed elements over the whole tensor."""
    models, epsilon = list(per_model), shared["epsilon"]

    def counts_of(chunk: TensorInputs) -> torch.Tensor:
        arrays = chunk.compiled_arrays(models, _SIDE + 3)
        if arrays is not None:  # one compiled pass that writes nothing
            return torch.from_numpy(cpu_kernels.ram_counts(*arrays, epsilon))
        nonzero, _, overlap, unique = _ram_masks(_stacked_task_vectors(chunk, models), epsilon)
        flat = lambda mask: mask.reshape(len(models), -1).sum(dim=1)  # noqa: E731
        return torch.stack([flat(nonzero & overlap), flat(nonzero & unique)])

    counts = inputs.whole_sum("ramplus_tl.counts", counts_of).round().long()
    shared_counts, unique_counts = counts[0], counts[1]
    rho = shared_counts / unique_counts.clamp(min=epsilon)
    scale = (1 + shared["r"] * rho.clamp(min=0, max=shared["alpha"])).to(out.device)
    if _ram_compiled(inputs, models, out):  # the scale as float32, as it multiplies the float32 changes below
        return _ram_in_one_pass(inputs, models, scale.float().tolist(), epsilon, out)

    task_vectors = _stacked_task_vectors(inputs, models)
    nonzero, element_counts, overlap, unique = _ram_masks(task_vectors, epsilon)
    changed = task_vectors * nonzero
    per_model_scale = scale.reshape(-1, *([1] * (task_vectors.dim() - 1)))
    merged = (changed * unique * per_model_scale + changed * overlap / element_counts.clamp(min=1)).sum(dim=0)
    return torch.add(inputs.tensors[0], merged, out=out)


def _variance(inputs: TensorInputs, models: list[str]) -> torch.Tensor:
    """torch.var(dim=0, unbiased=False) of the stacked task vectors, bit for bit (Welford's update in float64, as
    torch's CPU kernel runs it), in a scratch buffer: on the CPU one compiled pass over the models and the base (a
    whole-tensor pass then writes no task vector), elsewhere whole-chunk torch operations (torch.var over a dim of
    2-3 models is about 25x slower)."""
    out = inputs.scratch(_SIDE + 2)  # a chunk's variance is used up before the next chunk's is asked for
    arrays = inputs.compiled_arrays(models, _SIDE + 3)
    if arrays is not None and cpu_kernels.compiled(out):  # one compiled pass
        cpu_kernels.variance(*arrays, cpu_kernels.flat(out))
        return out
    vectors = _task_vectors(inputs, models)
    mean = vectors[0].double()
    m2 = torch.zeros_like(mean)
    for count, vector in enumerate(vectors[1:], start=2):
        value = vector.double()
        delta = value - mean
        mean += delta / count
        m2 += delta * (value - mean)
    return (m2 / len(vectors)).float()


def _sce_mask(inputs: TensorInputs, models: list[str], share: float) -> torch.Tensor:
    """1.0 where an element is among the `share` of elements of highest variance across models (SCE's select),
    else 0.0, in the chunk's variance buffer."""
    if share >= 1 or share <= 0:
        return inputs.scratch(_SIDE + 2).fill_(1.0 if share >= 1 else 0.0)
    variance = _variance(inputs, models)
    # The variances depend on the models' weights alone (in this order): their count of non-zeros, and a sample that
    # brackets any share's cut, serve every later merge of these models.
    named = "/".join(models)
    count_nonzero = lambda chunk: torch.count_nonzero(_variance(chunk, models))  # noqa: E731
    nonzero = inputs.whole_sum(f"sce.nonzero/{named}", count_nonzero, lasting=True)
    count = int(int(nonzero.round()) * share)
    if count == 0:
        return variance.zero_()
    compute = lambda chunk: _variance(chunk, models)  # noqa: E731
    (cut,) = inputs.cuts("sce.variance", [count], compute, variance, sampled=f"sce.variance/{named}")
    return cut.mask(variance, inputs.start, out=variance)


def _sce_selected(inputs: TensorInputs, models: list[str], share: float) -> torch.Tensor:
    """The stacked task vectors with only SCE's selected elements kept."""
    return _stacked_task_vectors(inputs, models) * _sce_mask(inputs, models, share).unsqueeze(0)


def sce(inputs: TensorInputs, shared: dict, per_model: dict[str, dict], out: torch.Tensor) -> torch.Tensor:
    """SCE: select the elements that vary most across models, weight each model by its mean squared (selected)
    task vector, erase the elements whose sign disagrees with the sum's, and average what is left."""
    models, share = list(per_model), shared["select_topk"]
    vectors = _task_vectors(inputs, models)
    compiled = cpu_kernels.fusable(vectors, inputs.tensors[0], out)
    mask = _sce_mask(inputs, models, share)
    task_vectors = None if compiled and not inputs.whole else _stacked_task_vectors(inputs, models) * mask
    if inputs.whole:
        weights = task_vectors.square().reshape(len(models), -1).mean(dim=1)
    else:

        def squares(chunk: TensorInputs) -> torch.Tensor:
            if compiled:  # one pass per model that writes nothing
                chunk_vectors = [cpu_kernels.flat(vector) for vector in _task_vectors(chunk, models)]
                selected = cpu_kernels.flat(_sce_mask(chunk, models, share))
                return torch.tensor(cpu_kernels.masked_squares(chunk_vectors, selected), dtype=torch.float64)
            return _sce_selected(chunk, models, share).double().square().reshape(len(models), -1).sum(dim=1)

        weights = (inputs.whole_sum("sce.squares", squares) / inputs.numel).float().to(out.device)
    weight_sum = float(weights.sum())
    weights = torch.ones_like(weights) / len(models) if abs(weight_sum) < 1e-6 else weights / weight_sum
    if compiled:  # the vote, the agreement and the weighted mean in one pass
        flat = cpu_kernels.flat
        deltas = [flat(vector) for vector in vectors]
        cpu_kernels.sce_merge(flat(inputs.tensors[0]), deltas, flat(mask), weights.tolist(), flat(out))
        return out
    sign_weight = task_vectors.sum(dim=0)
    majority = (sign_weight >= 0).to(task_vectors.dtype) * 2 - 1
    agrees = task_vectors.sign() == majority
    erased = weights.reshape(-1, *([1] * (task_vectors.dim() - 1))) * agrees
    merged = (task_vectors * erased).sum(dim=0) / erased.sum(dim=0).clamp(min=1e-6)
    return torch.add(inputs.tensors[0], merged, out=out)
