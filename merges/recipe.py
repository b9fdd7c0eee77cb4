"""Merge recipes in mergekit's vocabulary (a method, a base, models with parameters; each parameter a scalar, a
gradient over layers or a list filtered by tensor name), validated before any tensor is read, plus mergekit YAML
import and export."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from safemerge.errors import UserError
from safemerge.merges.methods import METHODS, Param

Scalar = StrictBool | StrictInt | StrictFloat | StrictStr


class Filtered(BaseModel):
    """mergekit's conditional parameter: `value` applies to tensors whose name contains `filter` (None: all)."""

    model_config = ConfigDict(extra="forbid")
    filter: str | None = None
    value: Scalar | list[Scalar]


Setting = Scalar | list[Scalar] | Filtered | list[Filtered]
MODULE_FILTERS = ("self_attn", "mlp")
DTYPES = ("float32", "float16", "bfloat16", "float64")


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: dict[str, Setting] = Field(default_factory=dict)


class Recipe(BaseModel):
    """A merge: `merge_method` applied to `models` (names the engine knows, or paths) around `base_model`."""

    model_config = ConfigDict(extra="forbid")
    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry]
    parameters: dict[str, Setting] = Field(default_factory=dict)
    alignment_model: str | None = None  # mergealign: the model whose task vector is the alignment vector
    seed: int = 0  # random methods (dare_*, della*): the same seed gives the same merge
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None

    def model_parameters(self, model: str) -> Mapping[str, Setting] | None:
        for entry in self.models:
            if entry.model == model:
                return entry.parameters
        return None


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    """Validate a recipe (a dict, e.g. loaded from YAML) and check it against the method table; errors name the
    field at fault."""
    if not isinstance(data, dict):
        raise UserError(f"{source} must be a mapping with merge_method and models, got {type(data).__name__}")
    unsupported = [key for key in ("slices", "modules", "tokenizer", "chat_template") if key in data]
    if unsupported:
        raise UserError(
            f"{source}: mergekit key {unsupported[0]!r} is not supported by safemerge; use models: with "
            "parameters (and tokenizer_source) instead"
        )
    recipe = validated(Recipe, data, source)
    check_recipe(recipe, source)
    return recipe


Model = TypeVar("Model", bound=BaseModel)


def validated(model: type[Model], data: dict, source: str) -> Model:
    """`data` as a `model`, or one error naming the first field at fault."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise UserError(f"{source}: {where}: {first['msg']}; fix that field") from None


def check_recipe(recipe: Recipe, source: str = "recipe") -> None:
    """Everything that can be checked without the models: method, parameter names and scopes, model roles."""
    method = METHODS.get(recipe.merge_method)
    if method is None:
        raise UserError(
            f"{source}: unknown merge_method {recipe.merge_method!r}; pick one of {', '.join(sorted(METHODS))}"
        )
    known = {param.name: param for param in method.params}
    for name in recipe.parameters:
        if name not in known:
            raise UserError(
                f"{source}: unknown parameter {name!r} for {method.name}; it takes {', '.join(sorted(known)) or 'none'}"
            )
    names = [entry.model for entry in recipe.models]
    if len(set(names)) != len(names):
        raise UserError(f"{source}: a model is listed twice in models; list each model once")
    for entry in recipe.models:
        for name in entry.parameters:
            param = known.get(name)
            if param is None:
                raise UserError(
                    f"{source}: unknown parameter {name!r} for model {entry.model!r} under {method.name}; it takes "
                    f"{', '.join(sorted(p.name for p in method.params if p.per_model)) or 'no per-model parameters'}"
                )
            if not param.per_model:
                raise UserError(
                    f"{source}: parameter {name!r} of {method.name} is shared by all models; move it from model "
                    f"{entry.model!r} to the top-level parameters"
                )
    scopes = [("parameters", recipe.parameters), *((f"model {e.model!r}", e.parameters) for e in recipe.models)]
    for where, scope in scopes:
        for name, setting in scope.items():
            try:
                _check_leaves(setting, known[name])
            except UserError as error:
                raise UserError(f"{source}: {where}: {error}") from None
    for key in ("dtype", "out_dtype"):
        value = getattr(recipe, key)
        if value is not None and value not in DTYPES:
            raise UserError(f"{source}: {key} {value!r} is not supported; use one of {', '.join(DTYPES)}")
    method.check_roles(recipe, source)


def lowered(recipe: Recipe, layer_cosines: Callable[[str, str], list[float]] | None = None) -> Recipe:
    """The recipe as the method it is defined by (safety_vector: a dare_linear), or itself; `layer_cosines` (the
    engine's) for a method that reads the models' weights (selective_layers)."""
    method = METHODS[recipe.merge_method]
    return method.lower(recipe, layer_cosines) if method.lower is not None else recipe


# Parameter resolution: mergekit's rules, so a YAML means the same tensors in both tools.

LAYER_PATTERN = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_index(tensor_name: str) -> int | None:
    match = LAYER_PATTERN.search(tensor_name)
    return int(match.group(1)) if match else None


def layer_position(tensor_name: str, num_layers: int) -> float:
    """mergekit's `t` for gradients: layer i of L sits at i / (L - 1); tensors outside the layers (embeddings,
    final norm, lm_head) sit at 0, so they take a gradient's first value."""
    index = layer_index(tensor_name)
    if index is None:
        return 0.0
    return index / (num_layers - 1) if num_layers > 1 else 1.0


def _coerce(value: Any, param: Param) -> Any:
    try:
        if param.kind is bool:
            if isinstance(value, bool):
                return value
            raise ValueError
        if isinstance(value, bool):
            raise ValueError
        if param.kind is int:
            if float(value) != int(value):
                raise ValueError
            return int(value)
        return float(value)
    except (TypeError, ValueError, OverflowError):
        wanted = {bool: "true or false", int: "a whole number"}.get(param.kind, "a number")
        raise UserError(f"parameter {param.name!r} must be {wanted}, got {value!r}; fix the recipe") from None


def _check_leaves(setting: Any, param: Param) -> None:
    """Every value a setting can yield has the parameter's type (so a typo fails even where it is shadowed)."""
    if isinstance(setting, Filtered):
        _check_leaves(setting.value, param)
    elif isinstance(setting, list):
        for item in setting:
            _check_leaves(item, param)
    elif param.kind is not bool and not math.isfinite(_coerce(setting, param)):
        raise UserError(f"parameter {param.name!r} is {setting}; use a finite number")


def evaluate_setting(setting: Any, tensor_name: str, position: float, param: Param) -> Any:
    """A setting's value for one tensor, or None when no filter matches (the next scope then applies)."""
    if isinstance(setting, Filtered):
        setting = [setting]
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(item, Filtered) for item in setting):
            for item in setting:
                if item.filter is None or item.filter == "*" or item.filter in tensor_name:
                    return evaluate_setting(item.value, tensor_name, position, param)
            return None
        values = [_coerce(item, param) for item in setting]
        if param.kind is not float:  # true/false and counts are not interpolated: the nearest lower layer's
            return values[int(position * (len(values) - 1))]
        scaled = position * (len(values) - 1)
        low = int(scaled)
        high = min(len(values) - 1, low + 1)
        fraction = scaled - low
        return (1 - fraction) * values[low] + fraction * values[high]
    return _coerce(setting, param)


def resolve_parameter(
    param: Param, scopes: Sequence[Mapping[str, Any] | None], tensor_name: str, position: float
) -> Any:
    """The first scope (model, then top-level) whose setting yields a value wins; else the method's default."""
    for scope in scopes:
        if scope is not None and param.name in scope:
            value = evaluate_setting(scope[param.name], tensor_name, position, param)
            if value is not None:
                return value
    return param.default


# Building recipes from search values.


def layer_group(layer: int, groups: int, num_layers: int) -> int:
    """The group of layer `layer` when num_layers layers are split into `groups` contiguous groups."""
    return layer * groups // num_layers


def per_layer(group_values: Sequence[float], num_layers: int) -> list[float]:
    """A gradient with one value per layer that holds `group_values[g]` on every layer of group g (layers split
    into len(group_values) contiguous groups, 1 to num_layers of them); mergekit reads it back exactly."""
    groups = len(group_values)
    if not 1 <= groups <= num_layers:
        raise UserError(f"layer groups must number 1 to {num_layers} (one per layer at most), got {groups}")
    return [float(group_values[layer_group(index, groups, num_layers)]) for index in range(num_layers)]


def per_module(
    self_attn: float | list[float] | None = None, mlp: float | list[float] | None = None, other: Any = None
) -> list[Filtered]:
    """A filtered list: attention tensors, MLP tensors and everything else (norms, embeddings, lm_head)."""
    items = [
        Filtered(filter=name, value=value)
        for name, value in zip(MODULE_FILTERS, (self_attn, mlp), strict=True)
        if value is not None
    ]
    if other is not None:
        items.append(Filtered(value=other))
    return items


# mergekit YAML export and import.


def _dump(setting: Any) -> Any:
    if isinstance(setting, Filtered):
        return setting.model_dump(exclude_none=True)
    if isinstance(setting, list):
        return [_dump(item) for item in setting]
    return setting


def _chain(first: Any, fallback: Any) -> Any:
    """One setting equivalent to trying `first`, then `fallback` (only filtered lists can fall through)."""
    if first is None:
        return fallback
    if fallback is None:
        return first
    items = [first] if isinstance(first, Filtered) else first
    if isinstance(items, list) and items and all(isinstance(item, Filtered) for item in items):
        tail = fallback if isinstance(fallback, list) and all(isinstance(i, Filtered) for i in fallback) else None
        return [*items, *(tail if tail is not None else [Filtered(value=fallback)])]
    return first


def to_mergekit(
    recipe: Recipe,
    model_paths: Mapping[str, str] | None = None,
    layer_cosines: Callable[[str, str], list[float]] | None = None,
) -> dict:
    """The mergekit configuration that `mergekit-yaml` turns into the same tensors as this recipe."""
    check_recipe(recipe)
    recipe = lowered(recipe, layer_cosines)
    paths = dict(model_paths or {})
    method = METHODS[recipe.merge_method]
    config: dict[str, Any] = {"merge_method": method.mergekit_name}
    if recipe.base_model is not None:
        config["base_model"] = paths.get(recipe.base_model, recipe.base_model)
    models = []
    for entry in recipe.models:
        parameters = {name: _dump(value) for name, value in entry.parameters.items()}
        if method.role_weights:
            parameters = {}
            if entry.model != recipe.base_model:
                lambda_name = method.role_weights[method.role(recipe, entry.model)]
                weight = _chain(entry.parameters.get(lambda_name), recipe.parameters.get(lambda_name))
                parameters["weight"] = _dump(weight if weight is not None else 1.0)
        item: dict[str, Any] = {"model": paths.get(entry.model, entry.model)}
        if parameters:
            item["parameters"] = parameters
        models.append(item)
    config["models"] = models
    shared = {
        name: _dump(value)
        for name, value in recipe.parameters.items()
        if not method.role_weights or name not in method.role_weights.values()
    }
    if shared:
        config["parameters"] = shared
    for key in ("dtype", "out_dtype"):
        if getattr(recipe, key) is not None:
            config[key] = getattr(recipe, key)
    if recipe.tokenizer_source is not None:
        source = recipe.tokenizer_source
        config["tokenizer_source"] = source if source in ("base", "union") else paths.get(source, source)
    return config


def to_mergekit_yaml(
    recipe: Recipe,
    model_paths: Mapping[str, str] | None = None,
    layer_cosines: Callable[[str, str], list[float]] | None = None,
) -> str:
    text = yaml.safe_dump(to_mergekit(recipe, model_paths, layer_cosines), sort_keys=False)
    if METHODS[recipe.merge_method].random:
        text = f"# random method: pass --random-seed to mergekit-yaml (safemerge seed {recipe.seed})\n" + text
    return text


def from_mergekit_yaml(text: str, source: str = "config") -> Recipe:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise UserError(f"{source} is not valid YAML ({error}); fix the file") from None
    return parse_recipe(data, source)
