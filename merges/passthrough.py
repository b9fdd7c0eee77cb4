"""mergekit's `passthrough`: a model stacked from layer ranges of other models (`slices:`, one source each), the
embeddings from the first slice's model and the final norm and output layer from the last one's, as mergekit plans
it. It changes the layer count, so it is a `safemerge merge` and export only: a search swaps weights into running
engines of a fixed shape."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml
from pydantic import BaseModel, ConfigDict

from safemerge.errors import UserError
from safemerge.merges.checkpoint import Checkpoint
from safemerge.merges.engine import DTYPES
from safemerge.merges.recipe import validated

PASSTHROUGH = "passthrough"
UNSEARCHABLE = (
    "passthrough changes the layer count, so it cannot be swapped into a running engine; merge it with "
    "`safemerge merge`, outside a search"
)
_LAYER = re.compile(r"(^|\.)layers\.(\d+)\.")


class SliceSource(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    layer_range: tuple[int, int]


class Slice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sources: list[SliceSource]


class SliceRecipe(BaseModel):
    """A passthrough merge: `slices`, each one layer range of one model, stacked in order."""

    model_config = ConfigDict(extra="forbid")
    merge_method: str
    slices: list[Slice]
    dtype: str | None = None
    out_dtype: str | None = None


def is_passthrough(data: object) -> bool:
    return isinstance(data, dict) and data.get("merge_method") == PASSTHROUGH


def parse_slices(data: dict, source: str = "config") -> SliceRecipe:
    """Validate a passthrough config; errors name the slice at fault."""
    if "models" in data:
        raise UserError(
            f"{source}: passthrough stacks layer ranges; list them under slices: (sources with layer_range)"
        )
    recipe = validated(SliceRecipe, data, source)
    if not recipe.slices:
        raise UserError(f"{source}: slices is empty; list at least one slice with sources: [{{model, layer_range}}]")
    for index, item in enumerate(recipe.slices):
        if len(item.sources) != 1:
            raise UserError(
                f"{source}: slices[{index}] has {len(item.sources)} sources; passthrough takes one per slice (to mix "
                "models, use another merge_method)"
            )
        start, end = item.sources[0].layer_range
        if not 0 <= start < end:
            raise UserError(
                f"{source}: slices[{index}]: layer_range [{start}, {end}] must be [first, end) with end > first >= 0"
            )
    for key in ("dtype", "out_dtype"):
        value = getattr(recipe, key)
        if value is not None and value not in DTYPES:
            raise UserError(f"{source}: {key} {value!r} is not supported; use one of {', '.join(DTYPES)}")
    return recipe


def _renamed(name: str, layer: int) -> str:
    return _LAYER.sub(lambda match: f"{match.group(1)}layers.{layer}.", name, count=1)


def _stacked(recipe: SliceRecipe, checkpoints: dict[str, Checkpoint]) -> Iterator[tuple[str, torch.Tensor]]:
    dtype = DTYPES.get(recipe.out_dtype or recipe.dtype or "")
    first = checkpoints[recipe.slices[0].sources[0].model]
    last = checkpoints[recipe.slices[-1].sources[0].model]

    def cast(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor

    outside = lambda checkpoint: [n for n in checkpoint.names if _LAYER.search(n) is None]  # noqa: E731
    for name in outside(first):
        if "embed" in name:  # mergekit's pre-weights: the embeddings, from the first slice's model
            yield name, cast(first.read(name))
    layer = 0
    for item in recipe.slices:
        source = item.sources[0]
        checkpoint = checkpoints[source.model]
        for index in range(*source.layer_range):
            for name in checkpoint.names:
                match = _LAYER.search(name)
                if match is not None and int(match.group(2)) == index:
                    yield _renamed(name, layer), cast(checkpoint.read(name))
            layer += 1
    for name in outside(last):
        if "embed" not in name:  # the post-weights: final norm and output layer, from the last slice's model
            yield name, cast(last.read(name))


def merge_slices(recipe: SliceRecipe, out_dir: Path, shard_size: int, force: bool = False) -> Path:
    """Write the stacked model as a Hugging Face folder (atomically), with its mergekit YAML."""
    from safemerge.merges.output import write_model_folder

    checkpoints: dict[str, Checkpoint] = {}
    for index, item in enumerate(recipe.slices):
        source = item.sources[0]
        if source.model not in checkpoints:
            if not Path(source.model).is_dir():
                raise UserError(f"slices[{index}]: model {source.model!r} is not a local model folder; give its path")
            checkpoints[source.model] = Checkpoint(source.model)
        layers = checkpoints[source.model].num_layers
        if layers is not None and source.layer_range[1] > layers:
            raise UserError(
                f"slices[{index}]: layer_range {list(source.layer_range)} reaches past {source.model!r}'s {layers} "
                f"layers; end it at {layers} or before"
            )
    total = sum(item.sources[0].layer_range[1] - item.sources[0].layer_range[0] for item in recipe.slices)
    first = Path(recipe.slices[0].sources[0].model)
    return write_model_folder(
        _stacked(recipe, checkpoints),
        out_dir,
        config_folder=first,
        tokenizer_folder=first,
        shard_size=shard_size,
        dtype=recipe.out_dtype or recipe.dtype,
        force=force,
        config_updates={"num_hidden_layers": total},
        extra_files={"mergekit_config.yml": slices_yaml(recipe)},
    )


def slices_yaml(recipe: SliceRecipe) -> str:
    """The recipe as mergekit YAML (mergekit reads it as it is)."""
    data = recipe.model_dump(exclude_none=True)
    for item in data["slices"]:
        for source in item["sources"]:
            source["layer_range"] = list(source["layer_range"])
    return yaml.safe_dump(data, sort_keys=False)
