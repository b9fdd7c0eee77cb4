"""The in-memory merge engine: loads the base and the experts once, keeps task vectors and recipe-independent tables
(dot products, sorted magnitudes, della ranks), and merges a recipe tensor by tensor in fp32 without touching disk."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from safemerge.errors import UserError
from safemerge.merges.checkpoint import Checkpoint, check_compatible
from safemerge.merges.methods import (
    METHODS,
    TASK_ARITHMETIC_FAMILY,
    Consensus,
    Sparsification,
    TensorInputs,
    chunked_dot,
    chunked_l1,
)
from safemerge.merges.recipe import Recipe, check_recipe, layer_position, resolve_parameter

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


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
    """

    def __init__(
        self,
        base: str | Path,
        models: Mapping[str, str | Path],
        base_name: str = "base",
        device: str | torch.device | None = None,
        recipe: Recipe | None = None,
    ) -> None:
        self.device = torch.device(device) if device is not None else default_device()
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
        self.dtypes: dict[str, torch.dtype] = {}
        self.base: dict[str, torch.Tensor] = {}
        self.task_vectors: dict[str, dict[str, torch.Tensor]] = {name: {} for name in self.names}
        self.passthrough: dict[str, torch.Tensor] = {}  # non-float tensors (buffers) are copied from the base
        self.gram: dict[str, torch.Tensor] = {}
        self.l1: dict[str, list[float]] = {}
        self._sorted: dict[tuple[str, str], np.ndarray] = {}
        self._rank_norm: dict[tuple[str, str], torch.Tensor] = {}
        self._scratch: list[torch.Tensor] = []
        self._largest = max(int(np.prod(base_checkpoint.shape(name))) for name in self.tensor_names)
        self._planned_names = [name for name in self.tensor_names if base_checkpoint.dtype(name).is_floating_point]
        if recipe is not None:
            self.plan(recipe)  # a recipe known up front is checked against the headers before any tensor is read
        try:
            self._load(base_checkpoint, checkpoints)
        finally:
            base_checkpoint.close()
            for checkpoint in checkpoints:
                checkpoint.close()

    def _load(self, base: Checkpoint, experts: list[Checkpoint]) -> None:
        for name in self.tensor_names:
            base_tensor = base.tensor(name)
            if not base_tensor.is_floating_point():
                self.passthrough[name] = base_tensor.clone()
                continue
            dtype = base_tensor.dtype
            reference = base_tensor.to(self.device, torch.float32)
            if reference.data_ptr() == base_tensor.data_ptr():
                reference = reference.clone()  # own the memory: never a view of a memory-mapped file
            vectors = [reference]
            for expert in experts:
                raw = expert.tensor(name)
                dtype = torch.promote_types(dtype, raw.dtype)
                vectors.append(torch.sub(raw.to(self.device, torch.float32), reference))
                self.task_vectors[expert.label][name] = vectors[-1]
            l1 = [chunked_l1(vector) for vector in vectors]
            for label, vector, norm in zip(
                [base.label, *(expert.label for expert in experts)], vectors, l1, strict=True
            ):
                if not math.isfinite(norm) and not bool(torch.isfinite(vector).all()):  # one extra pass only if needed
                    raise UserError(
                        f"model {label!r} has NaN or Inf values in tensor {name}; the checkpoint is corrupt or "
                        "diverged, use another checkpoint"
                    )
            self.l1[name] = l1
            self.base[name] = reference
            self.dtypes[name] = dtype
            # Dot products of base and task vectors: slerp, nuslerp, model_stock and the similarity
            # report need only these scalars, so their per-trial cost is one linear combination.
            flat = [vector.reshape(-1) for vector in vectors]
            gram = torch.empty(len(flat), len(flat), dtype=torch.float64)
            for i in range(len(flat)):
                for j in range(i, len(flat)):
                    gram[i, j] = gram[j, i] = chunked_dot(flat[i], flat[j])
            self.gram[name] = gram

    # Recipe-independent tables for sparsifying methods, built once on first use (or ahead with `prepare`).

    def prepare(self, methods: Iterable[str]) -> None:
        """Build the tables the given methods need now, so the first trial is as fast as the rest."""
        for method in methods:
            row = TASK_ARITHMETIC_FAMILY.get(method)
            if row is None:
                continue
            for model in self.names:
                for name in self.base:
                    if row.sparsification in (Sparsification.magnitude, Sparsification.breadcrumbs):
                        self.sorted_magnitudes(model, name)
                    if row.sparsification == Sparsification.della:
                        self.rank_norm(model, name)

    def sorted_magnitudes(self, model: str, name: str) -> np.ndarray:
        """|task vector| sorted ascending: the magnitude cut for any density is an index into it."""
        key = (model, name)
        if key not in self._sorted:
            magnitudes = self.task_vectors[model][name].abs().reshape(-1)
            if magnitudes.device.type == "cpu":
                self._sorted[key] = np.sort(magnitudes.numpy())
            else:
                self._sorted[key] = torch.sort(magnitudes).values.cpu().numpy()
        return self._sorted[key]

    def rank_norm(self, model: str, name: str) -> torch.Tensor:
        """della's magnitude rank of each element within its row, scaled to [0, 1]."""
        key = (model, name)
        if key not in self._rank_norm:
            task_vector = self.task_vectors[model][name]
            rows = task_vector.reshape(1, -1) if task_vector.dim() < 2 else task_vector
            ranks = torch.argsort(torch.argsort(rows.abs(), dim=1), dim=1).to(torch.float32)
            self._rank_norm[key] = (ranks / max(rows.shape[1] - 1, 1)).reshape(task_vector.shape)
        return self._rank_norm[key]

    def _scratch_buffer(self, index: int, shape: torch.Size) -> torch.Tensor:
        while len(self._scratch) <= index:
            self._scratch.append(torch.empty(self._largest, dtype=torch.float32, device=self.device))
        return self._scratch[index][: shape.numel()].view(shape)

    # Planning: every parameter of every tensor resolved and checked before any tensor math.

    def plan(self, recipe: Recipe) -> list[TensorPlan]:
        check_recipe(recipe)
        method = METHODS[recipe.merge_method]
        known = set(self.basis)
        for model in [entry.model for entry in recipe.models] + [recipe.base_model]:
            if model is not None and model not in known:
                raise UserError(
                    f"recipe names model {model!r}, which this engine does not hold; use one of {', '.join(self.basis)}"
                )
        sparse = TASK_ARITHMETIC_FAMILY.get(method.name)
        if (
            sparse is not None
            and (sparse.sparsification != Sparsification.none or sparse.consensus != Consensus.none)
            and recipe.base_model != self.base_name
        ):
            raise UserError(
                f"{method.name} with base_model {recipe.base_model!r}: sparsification and sign consensus need the "
                f"task vectors against the engine's base {self.base_name!r}; use base_model {self.base_name!r} or "
                "build the engine on that base"
            )
        self._tokenizer_source(recipe)
        inputs = method.inputs(recipe)
        shared_params = [param for param in method.params if not param.per_model]
        model_params = [param for param in method.params if param.per_model]
        plans = []
        for name in self._planned_names:
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
        return plans

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
        """Yield (name, merged tensor) one tensor at a time, in the output dtype on the engine's device.

        With `out`, each result is written into out[name] (for example the previous trial's tensors, or a
        generation engine's own weights) instead of a new tensor.
        """
        plans = self.plan(recipe)  # all validation happens here, before the first tensor is computed
        method = METHODS[recipe.merge_method]
        out_dtype = DTYPES[recipe.out_dtype or recipe.dtype] if (recipe.out_dtype or recipe.dtype) else None
        for plan in plans:
            name = plan.name
            dtype = out_dtype or self.dtypes[name]
            target = out.get(name) if out is not None else None
            direct = target is not None and target.dtype == torch.float32 and target.device == self.device
            result = target if direct else torch.empty_like(self.base[name])
            method.kernel(self._inputs(recipe, name), plan.shared, plan.per_model, result)
            if not direct:
                result = result.to(dtype)
                if target is not None:
                    result = target.copy_(result)
            yield name, result
        for name, tensor in self.passthrough.items():
            yield name, tensor

    def merge(self, recipe: Recipe, out: MutableMapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The merged model as name -> tensor (written into `out` when given)."""
        return dict(self.iter_merge(recipe, out))

    def _inputs(self, recipe: Recipe, name: str) -> TensorInputs:
        reference = self.base[name]
        seed = recipe.seed
        return TensorInputs(
            name=name,
            basis=self.basis,
            tensors=[reference, *(self.task_vectors[model][name] for model in self.names)],
            gram=self.gram[name],
            l1=self.l1[name],
            sorted_magnitudes=lambda model: self.sorted_magnitudes(model, name),
            rank_norm=lambda model: self.rank_norm(model, name),
            fill_uniform=lambda model, buffer: fill_uniform(buffer, f"{seed}/{name}/{model}"),
            keep_mask=lambda model, probability, buffer: keep_mask(buffer, probability, f"{seed}/{name}/{model}"),
            scratch=lambda index: self._scratch_buffer(index, reference.shape),
        )

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
            extra_files={"mergekit_config.yml": to_mergekit_yaml(recipe, paths)},
        )


RANDOM_CHUNK = 1 << 20
_random_threads = ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads()))


def _seed(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") & (2**63 - 1)


def _chunk_generator(key: str, start: int) -> np.random.Generator:
    """The generator for the chunk at `start`: seeded by key and offset, so no chunk depends on another."""
    return np.random.Generator(np.random.PCG64(_seed(f"{key}/{start}")))


def _in_chunks(size: int, fill: Callable[[int], None]) -> None:
    """Call fill(start) for each RANDOM_CHUNK of `size` elements, on several threads when there is more than one."""
    starts = range(0, size, RANDOM_CHUNK)
    if len(starts) == 1:
        fill(0)
    else:
        list(_random_threads.map(fill, starts))


def fill_uniform(buffer: torch.Tensor, key: str) -> torch.Tensor:
    """Fill `buffer` with U[0, 1) seeded by `key`: the same key gives the same numbers, in any order of tensors.

    On the CPU, numpy's PCG64 fills fixed-size chunks (each seeded by key and offset) on several threads, as torch's
    CPU generator is serial and slower; the chunking is fixed, so results do not depend on the thread count."""
    if buffer.device.type != "cpu":
        return buffer.uniform_(generator=torch.Generator(device=buffer.device).manual_seed(_seed(key)))
    flat = buffer.view(-1).numpy()

    def fill(start: int) -> None:
        _chunk_generator(key, start).random(dtype=np.float32, out=flat[start : start + RANDOM_CHUNK])

    _in_chunks(flat.size, fill)
    return buffer


def keep_mask(buffer: torch.Tensor, probability: float, key: str) -> torch.Tensor:
    """Fill `buffer` with 1.0 where an element is kept (probability `probability`), else 0.0, seeded by `key`.

    On the CPU each element takes 16 random bits (raw PCG64 output, 4 elements per draw), so the probability is
    exact to 1/65536; that is the cheapest Bernoulli draw here, and DARE's per-trial cost is mostly this draw."""
    if buffer.device.type != "cpu":
        return torch.lt(fill_uniform(buffer, key), probability, out=buffer)
    threshold = min(32767, max(-32768, round(probability * 65536) - 32768))  # int16 draw < threshold: kept
    flat = buffer.view(-1)

    def fill(start: int) -> None:
        chunk = flat[start : start + RANDOM_CHUNK]
        bits = _chunk_generator(key, start).bit_generator.random_raw((chunk.numel() + 3) // 4)
        draws = torch.from_numpy(bits.view(np.int16)[: chunk.numel()])
        chunk.copy_(draws < threshold)

    _in_chunks(flat.numel(), fill)
    return buffer
