"""The in-memory merge engine: holds a model family at its checkpoint precision (bf16 stays bf16) with a few
per-tensor scalars (dot products, L1 norms), and merges a recipe tensor by tensor in fp32 without touching disk.

Memory: each tensor is merged in chunks of whole rows of at most CHUNK_ELEMENTS elements, so beyond the models'
own bytes the engine holds only a few chunk-sized fp32 buffers and the one output tensor being handed over. The
task vectors are recomputed per chunk (a subtraction, exact to mergekit's fp32 math); cuts by magnitude are exact
selections per tensor (merges/methods/selection.py); nothing per element is kept between merges.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from safemerge.errors import UserError
from safemerge.merges.checkpoint import Checkpoint, check_compatible
from safemerge.merges.methods import (
    METHODS,
    TensorInputs,
    chunked_dot,
    chunked_l1,
    cpu_kernels,
)
from safemerge.merges.methods.inputs import chunk_gram_along
from safemerge.merges.methods.selection import TopCut, sample_positions, top_cuts
from safemerge.merges.recipe import Recipe, check_recipe, layer_index, layer_position, lowered, resolve_parameter

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}

FLOAT32_MAX = float(torch.finfo(torch.float32).max)

# Rows per chunk are chosen so a chunk holds at most this many elements (4 MB in fp32): small enough that the
# buffers are a few percent of a 250M-parameter family, large enough that each torch call is mostly arithmetic.
CHUNK_ELEMENTS = 1 << 20


def chunk_ranges(shape: Sequence[int], chunk_elements: int = CHUNK_ELEMENTS) -> list[tuple[int, int]]:
    """Flat (start, end) offsets of a tensor's chunks: blocks of whole rows along dim 0 of at most
    `chunk_elements` elements (one row at least); tensors of fewer than two dims are one chunk."""
    numel = math.prod(shape)
    if len(shape) < 2 or numel <= chunk_elements:
        return [(0, numel)]
    row = numel // shape[0]
    rows = max(1, chunk_elements // row)
    return [(first * row, min(first + rows, shape[0]) * row) for first in range(0, shape[0], rows)]


def largest_chunk(shapes: Sequence[Sequence[int]]) -> int:
    """Elements of the largest chunk of any of the tensors (what one scratch buffer holds)."""
    return max((end - start for shape in shapes for start, end in chunk_ranges(shape)), default=0)


def scratch_buffers(task_vectors: int) -> int:
    """Chunk-sized fp32 buffers a merge may hold with this many task vectors: the chunk's base and task vectors
    and the kernel's masks and sums (3n + 6), a second set for whole-tensor passes (3n + 1), and in each set
    della's int64 sort keys (2 + 2)."""
    return 6 * task_vectors + 11


def scratch_bytes(shapes: Sequence[Sequence[int]], task_vectors: int) -> int:
    """Bytes of scratch a merge of tensors of these shapes holds at most, on the merge device: the fp32 chunk
    buffers, and the random masks of one tensor (a bit per element and task vector) that a rescaled DARE or della
    merge of a tensor in several chunks draws in its L1 pass and keeps for its merge pass."""
    largest_tensor = max((math.prod(shape) for shape in shapes), default=0)
    return 4 * largest_chunk(shapes) * scratch_buffers(task_vectors) + task_vectors * -(-largest_tensor // 8)


@dataclass
class TensorPlan:
    """One output tensor's resolved parameters: shared values and one dict per input model."""

    name: str
    shared: dict[str, Any]
    per_model: dict[str, dict[str, Any]]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class MergeEngine:
    """Holds a model family in memory and merges recipes over it.

    `base` is the reference every task vector is taken against; `models` maps names to folders. Names are what
    recipes use in `base_model` and `models`: a sparsifying method (ties, dare_*, breadcrumbs*, della*) needs
    base_model to be this base, the others accept any held model (e.g. SLERP from the aligned model to an expert).
    A `recipe` given here is validated against the checkpoint headers before any tensor is read.

    `device` is where the merge math runs; `store_device` where the models are held (default: the merge device);
    `chunk_elements` bounds the rows merged at once (tests make it small to cover the chunked paths).
    A store on the CPU for a GPU merge is pinned, so each chunk streams to the device at full speed; which of the
    two a worker uses is its memory plan's decision (search/plan.py).
    """

    def __init__(
        self,
        base: str | Path,
        models: Mapping[str, str | Path],
        base_name: str = "base",
        device: str | torch.device | None = None,
        recipe: Recipe | None = None,
        store_device: str | torch.device | None = None,
        chunk_elements: int = CHUNK_ELEMENTS,
    ) -> None:
        self.device = torch.device(device) if device is not None else default_device()
        self.store_device = torch.device(store_device) if store_device is not None else self.device
        self.base_name = base_name
        if base_name in models:
            raise UserError(f"model name {base_name!r} is used for both the base and an expert; rename one")
        base_checkpoint = Checkpoint(base, base_name)
        checkpoints = [Checkpoint(path, name) for name, path in models.items()]
        check_compatible(base_checkpoint, checkpoints)  # headers only: fail before any tensor is read
        self.model_folders = {base_name: Path(base), **{name: Path(path) for name, path in models.items()}}
        self.config = base_checkpoint.config
        self.num_layers = int(base_checkpoint.num_layers or 1)
        self.names = [*models]
        self.basis = [base_name, *self.names]
        self.tensor_names = base_checkpoint.names
        self.float_names = [name for name in self.tensor_names if base_checkpoint.dtype(name).is_floating_point]
        self.shapes = {name: torch.Size(base_checkpoint.shape(name)) for name in self.tensor_names}
        self.dtypes: dict[str, torch.dtype] = {}  # the output dtype by default: the widest of the models'
        self.store: dict[str, list[torch.Tensor]] = {}  # name -> each basis model's tensor, at its own dtype
        self.passthrough: dict[str, torch.Tensor] = {}  # non-float tensors (buffers) are copied from the base
        self.gram: dict[str, torch.Tensor] = {}
        self.l1: dict[str, list[float]] = {}
        self._chunks = {name: chunk_ranges(self.shapes[name], chunk_elements) for name in self.float_names}
        self._chunk_elements = max(
            (end - start for ranges in self._chunks.values() for start, end in ranges), default=0
        )
        self._pools: dict[int, dict[int, torch.Tensor]] = {}
        # (tensor, slot) -> ascending |task vector| sample, (tensor, key) -> an ascending sample of other values of
        # the weights alone (TensorInputs.cuts' `sampled`): a few thousand values that bracket any cut.
        self._samples: dict[tuple[str, int | str], np.ndarray] = {}
        # Figures that depend on the weights alone, not on a recipe, kept across merges (arcee_fusion's quartiles, a
        # few scalars per tensor, and its row divergences, a float per row; SCE's count of varying elements):
        # (tensor, key, count) -> cut and (tensor, key, chunk start, or -1 for the whole tensor) -> values.
        self._lasting_cuts: dict[tuple[str, str, int], TopCut] = {}
        self._lasting_values: dict[tuple[str, str, int], torch.Tensor] = {}
        if recipe is not None:
            self.plan(recipe)  # a recipe known up front is checked against the headers before any tensor is read
        try:
            self._load(base_checkpoint, checkpoints)
        finally:
            base_checkpoint.close()
            for checkpoint in checkpoints:
                checkpoint.close()

    def _load(self, base: Checkpoint, experts: list[Checkpoint]) -> None:
        pin = self.store_device.type == "cpu" and self.device.type == "cuda"
        for name in self.tensor_names:
            if name not in self._chunks:
                self.passthrough[name] = base.read(name, self.store_device)
                continue
            held = [checkpoint.read(name, self.store_device, pin=pin) for checkpoint in (base, *experts)]
            dtype = held[0].dtype
            for tensor in held[1:]:
                dtype = torch.promote_types(dtype, tensor.dtype)
            self.store[name], self.dtypes[name] = held, dtype
            self._tensor_scalars(name)

    def _tensor_scalars(self, name: str) -> None:
        """L1 norms and dot products of base and task vectors over the whole tensor, summed chunk by chunk:
        slerp, nuslerp, model_stock, rescaling and the similarity report need only these scalars."""
        size = len(self.basis)
        l1 = [0.0] * size
        gram = torch.zeros(size, size, dtype=torch.float64)
        total, chunked = self.shapes[name].numel(), len(self._chunks[name]) > 1
        samples: list[list[np.ndarray]] = [[] for _ in range(size)]
        for start, tensors in self.iter_chunks(name):
            flat = [tensor.reshape(-1) for tensor in tensors]
            for i in range(size):
                l1[i] += chunked_l1(flat[i])
                for j in range(i, size):
                    gram[i, j] += chunked_dot(flat[i], flat[j])
                if chunked and i > 0:
                    picked = flat[i][sample_positions(start, flat[i].numel(), total)]
                    samples[i].append(picked.abs().cpu().numpy())
        if chunked:  # a few thousand |task vector| values: they bracket any magnitude cut, so one pass finds it
            for slot in range(1, size):
                self._samples[(name, slot)] = np.sort(np.concatenate(samples[slot]))
        for label, norm in zip(self.basis, l1, strict=True):
            if not math.isfinite(norm):
                raise UserError(
                    f"model {label!r} has NaN or Inf values in tensor {name}; the checkpoint is corrupt or "
                    "diverged, use another checkpoint"
                )
        self.gram[name] = gram + gram.triu(1).T
        self.l1[name] = l1

    # Chunks: a tensor's base and task vectors in fp32, block of rows by block of rows.

    def _buffer(self, pool: int, index: int, count: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        buffers = self._pools.setdefault(pool, {})
        if (index, dtype) not in buffers:
            buffers[index, dtype] = torch.empty(self._chunk_elements, dtype=dtype, device=self.device)
        return buffers[index, dtype][:count]

    def _materialize(
        self, name: str, start: int, end: int, slots: Sequence[int], pool: int
    ) -> list[torch.Tensor | None]:
        """The chunk [start, end) of tensor `name`: slot 0 the base, slot j in `slots` the task vector of
        basis[j] (its model minus the base, in fp32 as mergekit computes it), in `pool`'s buffers."""
        held = self._held(name, start, end)
        tensors: list[torch.Tensor | None] = [None] * len(held)
        # An fp32 model held on the merge device is read in place (kernels never write into their inputs).
        base = held[0] if self._direct(held[0]) else self._buffer(pool, -1, end - start).view(held[0].shape)
        tensors[0] = base if base is held[0] else base.copy_(held[0], non_blocking=True)
        for slot in slots:
            if slot != 0:
                tensors[slot] = self._task_vector(held, slot, tensors, pool)
        return tensors

    def _held(self, name: str, start: int, end: int) -> list[torch.Tensor]:
        """Each basis model's elements [start, end) of tensor `name` as held (its dtype and device), shaped as a
        block of rows."""
        shape = self.shapes[name]
        chunk_shape = (((end - start) // (math.prod(shape[1:]) or 1)), *shape[1:]) if len(shape) > 1 else shape
        return [tensor.view(-1)[start:end].view(chunk_shape) for tensor in self.store[name]]

    def _direct(self, held: torch.Tensor) -> bool:
        return held.dtype == torch.float32 and held.device == self.device

    def _task_vector(
        self, held: list[torch.Tensor], slot: int, tensors: list[torch.Tensor | None], pool: int
    ) -> torch.Tensor:
        """Slot `slot`'s task vector of a chunk whose base is tensors[0], computed into its buffer of `pool` and
        set in `tensors`."""
        if tensors[slot] is None:
            base, vector = tensors[0], self._buffer(pool, -1 - slot, held[0].numel()).view(held[0].shape)
            if self._direct(held[slot]):
                tensors[slot] = torch.sub(held[slot], base, out=vector)
            else:
                tensors[slot] = vector.copy_(held[slot], non_blocking=True).sub_(base)
        return tensors[slot]  # type: ignore[return-value]

    def iter_chunks(self, name: str, pool: int = 1) -> Iterator[tuple[int, list[torch.Tensor]]]:
        """(flat start, [base, task vector of each model]) per chunk of tensor `name`, fp32 on the merge device;
        the tensors are reused buffers, valid until the next chunk."""
        slots = range(len(self.basis))
        for start, end in self._chunks[name]:
            yield start, self._materialize(name, start, end, slots, pool)  # type: ignore[misc]

    def base_tensor(self, name: str) -> torch.Tensor:
        """The base's tensor `name` in fp32 (a new tensor: for reports and tests, not the merge path)."""
        return self.store[name][0].to(self.device, torch.float32)

    def layer_cosines(self, model_a: str, model_b: str) -> list[float]:
        """Per layer, the cosine between the two models' task vectors over all of the layer's tensors (from the
        per-tensor grams computed at load: no pass over the weights)."""
        a, b = self.basis.index(model_a), self.basis.index(model_b)
        grams = [torch.zeros(len(self.basis), len(self.basis), dtype=torch.float64) for _ in range(self.num_layers)]
        for name in self.float_names:
            layer = layer_index(name)
            if layer is not None and layer < self.num_layers:
                grams[layer] += self.gram[name].to(torch.float64)
        return [float(g[a, b]) / max(math.sqrt(float(g[a, a]) * float(g[b, b])), 1e-30) for g in grams]

    def task_vector(self, model: str, name: str) -> torch.Tensor:
        """Model `model`'s task vector of tensor `name` in fp32 (a new tensor: for reports and tests)."""
        held = self.store[name]
        return held[self.basis.index(model)].to(self.device, torch.float32) - held[0].to(self.device, torch.float32)

    def held_bytes(self) -> dict[str, int]:
        """Bytes the engine holds: the models at their dtypes ('store') and its fp32 buffers ('scratch')."""
        store = sum(tensor.numel() * tensor.element_size() for held in self.store.values() for tensor in held)
        store += sum(tensor.numel() * tensor.element_size() for tensor in self.passthrough.values())
        buffers = [buffer for pool in self._pools.values() for buffer in pool.values()]
        scratch = sum(buffer.numel() * buffer.element_size() for buffer in buffers)
        return {"store": store, "scratch": scratch}

    # Planning: every parameter of every tensor resolved and checked before any tensor math.

    def plan(self, recipe: Recipe) -> list[TensorPlan]:
        return self._lowered_plan(recipe)[1]

    def _lowered_plan(self, recipe: Recipe) -> tuple[Recipe, list[TensorPlan]]:
        """The recipe as the method it is defined by (`lowered`) and its plan, lowered once."""
        check_recipe(recipe)
        recipe = lowered(recipe, self.layer_cosines)
        method = METHODS[recipe.merge_method]
        known = set(self.basis)
        for model in [entry.model for entry in recipe.models] + [recipe.base_model]:
            if model is not None and model not in known:
                raise UserError(
                    f"recipe names model {model!r}, which this engine does not hold; use one of {', '.join(self.basis)}"
                )
        if method.engine_base and recipe.base_model != self.base_name:
            raise UserError(
                f"{method.name} with base_model {recipe.base_model!r}: it works on the task vectors against the "
                f"engine's base {self.base_name!r} element by element; use base_model {self.base_name!r} or build "
                "the engine on that base"
            )
        self._tokenizer_source(recipe)
        inputs = method.inputs(recipe)
        shared_params = [param for param in method.params if not param.per_model]
        model_params = [param for param in method.params if param.per_model]
        plans = []
        for name in self.float_names:
            position = layer_position(name, self.num_layers)
            shared = {
                param.name: resolve_parameter(param, [recipe.parameters], name, position) for param in shared_params
            }
            per_model: dict[str, dict[str, Any]] = {}
            for model in inputs:
                scopes = [recipe.model_parameters(model), recipe.parameters]
                values = {}
                for param in model_params:
                    if method.role_weights and param.name != method.role_weights[method.role(recipe, model)]:
                        continue
                    values["weight" if method.role_weights else param.name] = resolve_parameter(
                        param, scopes, name, position
                    )
                per_model[model] = values
            self._check_values(recipe, method.name, name, shared, per_model)
            shared["base_model"] = recipe.base_model
            plans.append(TensorPlan(name, shared, per_model))
        return recipe, plans

    def _tokenizer_source(self, recipe: Recipe) -> str:
        """The model whose tokenizer the merged folder takes: the base, or a named merged model."""
        source = recipe.tokenizer_source
        if source in (None, "base"):
            return recipe.base_model or self.base_name
        if source not in self.model_folders:
            raise UserError(
                f"tokenizer_source {source!r} is not supported; use 'base' or one of the merged models "
                f"({', '.join(self.basis)}); safemerge does not build union vocabularies"
            )
        return source

    def _check_values(self, recipe: Recipe, method: str, tensor: str, shared: dict, per_model: dict) -> None:
        scopes = [("the top-level parameters", shared)] + [(f"model {m!r}", v) for m, v in per_model.items()]
        for scope, values in scopes:
            for key, value in values.items():
                if isinstance(value, float) and not abs(value) <= FLOAT32_MAX:
                    raise UserError(
                        f"{method} parameter {key!r} of {scope} is {value:g} for tensor {tensor}, outside float32's "
                        "range, in which the merge is computed; use a finite value of a sensible size"
                    )
        for key, value in shared.items():
            if value is None:
                raise UserError(
                    f"{method} needs parameter {key!r} (tensor {tensor}); add it to the top-level parameters"
                )
        for model, values in per_model.items():
            for key, value in values.items():
                if value is None:
                    raise UserError(
                        f"{method} needs parameter {key!r} for model {model!r} (tensor {tensor}); add it to that "
                        "model's parameters or to the top-level parameters"
                    )
            density = values.get("density")
            if density is not None and not 0 < density <= 1:
                raise UserError(
                    f"density {density:g} for model {model!r} (tensor {tensor}) is outside (0, 1]; use a share of "
                    "elements to keep such as 0.5"
                )
            gamma = values.get("gamma")
            if gamma is not None and not 0 <= gamma < 1:
                raise UserError(
                    f"gamma {gamma:g} for model {model!r} (tensor {tensor}) is outside [0, 1); use e.g. 0.01"
                )
            epsilon = values.get("epsilon")
            if epsilon is not None and density < 1 and not (0 < density - epsilon and density + epsilon < 1):
                raise UserError(
                    f"epsilon {epsilon:g} with density {density:g} for model {model!r} (tensor {tensor}) puts "
                    "density +/- epsilon outside (0, 1); lower epsilon"
                )
        if method == "linear" and shared["normalize"] and sum(v["weight"] for v in per_model.values()) == 0:
            raise UserError(
                f"linear weights sum to zero for tensor {tensor}, so normalizing divides by zero; change the "
                "weights or set normalize: false"
            )

    # Merging.

    def iter_merge(
        self, recipe: Recipe, out: MutableMapping[str, torch.Tensor] | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, merged tensor) one tensor at a time, in the output dtype on the engine's device: a new
        tensor each, which the consumer copies into its weights and drops, so no full copy of the model is made.

        With `out`, each result is written into out[name] (for example a previous merge's tensors) instead.
        """
        recipe, plans = self._lowered_plan(recipe)  # all validation happens here, before the first tensor
        method = METHODS[recipe.merge_method]
        out_dtype = DTYPES[recipe.out_dtype or recipe.dtype] if (recipe.out_dtype or recipe.dtype) else None
        for plan in plans:
            name = plan.name
            target = out.get(name) if out is not None else None
            yield name, self._merge_tensor(recipe, method, plan, out_dtype or self.dtypes[name], target)
        for name, tensor in self.passthrough.items():
            yield name, tensor

    def merge(self, recipe: Recipe, out: MutableMapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The merged model as name -> tensor (written into `out` when given). A full copy of the model: a worker
        streams `iter_merge` into its engines instead."""
        return dict(self.iter_merge(recipe, out))

    def _merge_tensor(
        self, recipe: Recipe, method: Any, plan: TensorPlan, dtype: torch.dtype, target: torch.Tensor | None
    ) -> torch.Tensor:
        name = plan.name
        shape = self.shapes[name]
        if target is not None and target.shape == shape and target.dtype == dtype and target.is_contiguous():
            result = target
        else:
            result = torch.empty(shape, dtype=dtype, device=self.device)
        direct = result.dtype == torch.float32 and result.device == self.device  # the kernel writes the result
        statistics = _TensorStatistics(self, recipe, name)
        slots = range(len(self.basis))
        for start, end in self._chunks[name]:
            tensors = self._materialize(name, start, end, slots, pool=0)
            inputs = self._inputs(recipe, name, start, tensors, statistics)  # type: ignore[arg-type]
            chunk = result.view(-1)[start:end].view(tensors[0].shape)  # type: ignore[union-attr]
            into = chunk if direct else self._buffer(0, -100, end - start).view(chunk.shape)
            written = method.kernel(inputs, plan.shared, plan.per_model, into)
            if not direct:
                chunk.copy_(written.view(chunk.shape))
        return result

    def _inputs(
        self, recipe: Recipe, name: str, start: int, tensors: list[torch.Tensor], statistics: _TensorStatistics
    ) -> TensorInputs:
        seed, shape = recipe.seed, tensors[0].shape
        pool = statistics.pool_of(tensors)
        key = lambda model: f"{seed}/{name}/{model}"  # noqa: E731  # a model's random stream in this tensor
        return TensorInputs(
            name=name,
            basis=self.basis,
            tensors=tensors,
            gram=self.gram[name],
            l1=self.l1[name],
            start=start,
            numel=self.shapes[name].numel(),
            whole=len(self._chunks[name]) == 1,
            statistics=statistics,
            fill_uniform=lambda model, buffer: fill_uniform(buffer, key(model), start),
            keep_mask=lambda model, probability, buffer: keep_mask(buffer, probability, key(model), start),
            stream=lambda model: stream_seed(key(model)),
            scratch=lambda index, dtype=torch.float32: self._buffer(pool, index, shape.numel(), dtype).view(shape),
            read=lambda model, buffer: self._read(name, model, start, buffer),
            task_vector=lambda model: self._task_vector(
                self._held(name, start, start + shape.numel()), self.basis.index(model), tensors, pool
            ),
        )

    def _read(self, name: str, model: str, start: int, buffer: torch.Tensor) -> torch.Tensor:
        """Model `model`'s own elements of the chunk at `start` (not base + task vector, which may round
        differently), in fp32: a view of the store where it is fp32 on the merge device, else copied into buffer."""
        held = self.store[name][self.basis.index(model)].view(-1)[start : start + buffer.numel()].view(buffer.shape)
        if held.dtype == torch.float32 and held.device == self.device:
            return held
        return buffer.copy_(held)

    def save(
        self,
        recipe: Recipe,
        out_dir: str | Path,
        shard_size: int = 5 * 1024**3,
        force: bool = False,
        model_paths: Mapping[str, str] | None = None,
    ) -> Path:
        """Write the merge as a Hugging Face folder (atomically), with config, tokenizer and the mergekit YAML."""
        from safemerge.merges.output import write_model_folder
        from safemerge.merges.recipe import to_mergekit_yaml

        plans = self.plan(recipe)
        del plans  # planned only to fail before the output folder is created
        tokenizer_folder = self.model_folders[self._tokenizer_source(recipe)]
        dtype = recipe.out_dtype or recipe.dtype
        paths = {name: str(folder) for name, folder in self.model_folders.items()}
        paths.update(model_paths or {})
        return write_model_folder(
            self.iter_merge(recipe),
            out_dir,
            config_folder=self.model_folders[recipe.base_model or self.base_name],
            tokenizer_folder=tokenizer_folder,
            shard_size=shard_size,
            dtype=dtype,
            force=force,
            extra_files={"mergekit_config.yml": to_mergekit_yaml(recipe, paths, self.layer_cosines)},
        )


class _TensorStatistics:
    """The whole-tensor figures of one tensor for one recipe, computed on first use and kept for its chunks:
    magnitude cuts, the L1 norm of a sparsified task vector (rescaling), dot products along dim 0. A tensor held
    in one chunk computes them from that chunk; others take a pass over the chunks in pool 1, so the buffers of
    the chunk being merged (pool 0) are left alone."""

    def __init__(self, engine: MergeEngine, recipe: Recipe, name: str) -> None:
        self.engine, self.recipe, self.name = engine, recipe, name
        self.total = engine.shapes[name].numel()
        self.whole = len(engine._chunks[name]) == 1
        self._cuts: dict[tuple[str, int], TopCut] = {}
        self._sums: dict[str, torch.Tensor] = {}
        self._value_cuts: dict[tuple[str, str, int], TopCut] = {}
        self._l1: dict[str, float] = {}
        self._grams: dict[int, torch.Tensor] = {}
        self._side_tensors: list[torch.Tensor] = []
        self._masks: dict[tuple[str, int], torch.Tensor] = {}  # (model, chunk start) -> packed bits
        self._recording = False

    def pool_of(self, tensors: list[torch.Tensor]) -> int:
        return 1 if tensors is self._side_tensors else 0

    def _side_chunks(self, slots: Sequence[int]) -> Iterator[tuple[int, list[torch.Tensor]]]:
        for start, end in self.engine._chunks[self.name]:
            self._side_tensors = self.engine._materialize(self.name, start, end, slots, pool=1)  # type: ignore[assignment]
            yield start, self._side_tensors

    def top_cuts(self, model: str, counts: Sequence[int], magnitudes: torch.Tensor) -> list[TopCut]:
        missing = [count for count in counts if (model, count) not in self._cuts]
        if missing:
            slot = self.engine.basis.index(model)

            def chunks() -> Iterator[tuple[int, torch.Tensor]]:
                for start, tensors in self._side_chunks([slot]):
                    yield start, tensors[slot].abs_()

            single = magnitudes if self.whole else None
            sample = self.engine._samples.get((self.name, slot))
            cuts = top_cuts(missing, self.total, chunks, single=single, sample=sample)
            self._cuts.update(((model, count), cut) for count, cut in zip(missing, cuts, strict=True))
        return [self._cuts[model, count] for count in counts]

    def sparsified_l1(self, model: str, chunk_l1: Callable[[TensorInputs], float]) -> float:
        if model not in self._l1:
            total = 0.0
            self._recording = True  # the merge pass takes the same random masks from here, not a second draw
            try:
                # Chunks of the base alone: chunk_l1 takes the task vector (TensorInputs.task_vector) where it
                # needs it, and the compiled DARE pass reads the model instead, writing nothing.
                for start, tensors in self._side_chunks([]):
                    inputs = self.engine._inputs(self.recipe, self.name, start, tensors, self)
                    total += chunk_l1(inputs)
            finally:
                self._recording = False
            self._l1[model] = total
        return self._l1[model]

    def _side_inputs(self) -> Iterator[TensorInputs]:
        # Chunks of the base alone: a figure's compute takes the task vectors it needs (TensorInputs.task_vector),
        # or reads the models themselves (TensorInputs.read) in one pass that writes no task vector.
        for start, tensors in self._side_chunks([]):
            yield self.engine._inputs(self.recipe, self.name, start, tensors, self)

    def whole_sum(self, key: str, compute: Callable[[TensorInputs], torch.Tensor]) -> torch.Tensor:
        if key not in self._sums:
            self._sums[key] = sum(compute(chunk).double().cpu() for chunk in self._side_inputs())  # type: ignore[assignment]
        return self._sums[key]

    def cuts(
        self,
        key: str,
        counts: Sequence[int],
        compute: Callable[[TensorInputs], torch.Tensor],
        values: torch.Tensor,
        lasting: bool = False,
        sampled: str | None = None,
    ) -> list[TopCut]:
        known: MutableMapping[tuple[str, str, int], TopCut] = self.engine._lasting_cuts if lasting else self._value_cuts
        missing = [count for count in counts if (self.name, key, count) not in known]
        if missing:
            samples = self.engine._samples
            sample = samples.get((self.name, sampled)) if sampled is not None else None
            picked: list[np.ndarray] = []  # the sample, taken from the first pass where none is kept yet

            def chunks() -> Iterator[tuple[int, torch.Tensor]]:
                first_pass = not picked
                for chunk in self._side_inputs():
                    chunk_values = compute(chunk)
                    if sampled is not None and sample is None and first_pass:
                        flat = chunk_values.reshape(-1)
                        picked.append(flat[sample_positions(chunk.start, flat.numel(), self.total)].cpu().numpy())
                    yield chunk.start, chunk_values

            single = values if self.whole else None
            cuts = top_cuts(missing, self.total, chunks, single=single, sample=sample)
            if picked:
                samples[self.name, sampled] = np.sort(np.concatenate(picked))  # type: ignore[index]
            known.update(((self.name, key, count), cut) for count, cut in zip(missing, cuts, strict=True))
        return [known[self.name, key, count] for count in counts]

    def lasting(self, key: str, start: int, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        known = self.engine._lasting_values
        if (self.name, key, start) not in known:
            known[self.name, key, start] = compute()
        return known[self.name, key, start]

    def random_mask(
        self, model: str, start: int, draw: Callable[[torch.Tensor], torch.Tensor], buffer: torch.Tensor
    ) -> torch.Tensor:
        packed = self.recorded_mask(model, start)
        if packed is not None:
            return unpack_mask(packed, buffer)
        mask = draw(buffer)
        if self._recording:
            self.record_mask(model, start, pack_mask(mask))
        return mask

    def recorded_mask(self, model: str, start: int) -> torch.Tensor | None:
        return self._masks.pop((model, start), None)

    def record_mask(self, model: str, start: int, packed: torch.Tensor) -> None:
        if self._recording:
            self._masks[model, start] = packed

    def gram_along(self, dim: int) -> torch.Tensor:
        if dim not in self._grams:
            slots = range(len(self.engine.basis))
            self._grams[dim] = sum(chunk_gram_along(tensors, dim) for _, tensors in self._side_chunks(slots))
        return self._grams[dim]


_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A 0/1 mask as one bit per element (uint8, little-endian within each byte), on the mask's device."""
    flat = mask.reshape(-1)
    if flat.device.type == "cpu":  # numpy's packbits: one pass, several times faster than the torch ops below
        return torch.from_numpy(np.packbits(flat.numpy() != 0, bitorder="little"))
    padded = torch.zeros(-(-flat.numel() // 8) * 8, dtype=torch.uint8, device=flat.device)
    padded[: flat.numel()] = flat.ne(0)
    return padded.view(-1, 8).mul_(_BITS.to(flat.device)).sum(dim=1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_mask, written into `out` (fp32, 1.0 where set)."""
    if packed.device.type == "cpu":
        bits = torch.from_numpy(np.unpackbits(packed.numpy(), count=out.numel(), bitorder="little"))
    else:
        bits = packed.unsqueeze(1).bitwise_and(_BITS.to(packed.device)).ne_(0).view(-1)[: out.numel()]
    return out.view(-1).copy_(bits).view(out.shape)


def stream_seed(key: str) -> int:
    """The 64-bit seed of the random stream named `key`."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") & (2**63 - 1)


def fill_uniform(buffer: torch.Tensor, key: str, start: int = 0) -> torch.Tensor:
    """Fill `buffer` with U[0, 1) seeded by `key`, as elements [start, start + numel) of one stream per tensor: the
    same key gives the same numbers whatever the chunking and the order of tensors.

    On the CPU each element is a hash of (key, its offset) (merges/methods/cpu_kernels.py: one compiled pass on
    the pool's threads, where torch's CPU generator is serial), so a chunk anywhere in the tensor is drawn
    directly; on a GPU torch's generator, seeded by key and offset."""
    if buffer.device.type != "cpu":
        generator = torch.Generator(device=buffer.device).manual_seed(stream_seed(f"{key}@{start}" if start else key))
        return buffer.uniform_(generator=generator)
    cpu_kernels.uniform(cpu_kernels.flat(buffer), stream_seed(key), start)
    return buffer


def keep_mask(buffer: torch.Tensor, probability: float, key: str, start: int = 0) -> torch.Tensor:
    """Fill `buffer` with 1.0 where an element is kept (probability `probability`, exact to 2**-24), else 0.0,
    seeded by `key`, as elements [start, start + numel) of the tensor's stream: kept where fill_uniform's draw is
    below `probability`, in one pass that writes only the mask (DARE's per-trial cost is mostly this draw)."""
    if buffer.device.type != "cpu":
        return torch.lt(fill_uniform(buffer, key, start), probability, out=buffer)
    cpu_kernels.keep(cpu_kernels.flat(buffer), probability, stream_seed(key), start)
    return buffer
