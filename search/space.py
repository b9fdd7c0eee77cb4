"""The search space, define-by-run: one function of an Optuna trial that reads like the recipe it builds.

The method is a categorical choice; every coefficient is conditional on it and varies per model, per layer
group and (optionally) per module filter (self_attn, mlp, everything else), in mergekit's vocabulary, so a
found recipe exports as a mergekit YAML as it is.
"""

from __future__ import annotations

from typing import Any

import optuna

from safemerge.merges.methods import METHODS, Param, searched_params
from safemerge.merges.recipe import per_layer, per_module
from safemerge.search.config import ALIGNED_ROLE, BASE_ROLE, SearchConfig

MODULES = ("self_attn", "mlp", "other")


def coefficient(trial: optuna.Trial, name: str, low: float, high: float, config: SearchConfig, num_layers: int) -> Any:
    """A scalar, a per-layer-group gradient, or a per-module filtered list of those, as the config asks."""

    def groups(prefix: str) -> float | list[float]:
        values = [trial.suggest_float(f"{prefix}.g{group}", low, high) for group in range(config.layer_groups)]
        return values[0] if config.layer_groups == 1 else per_layer(values, num_layers)

    if not config.module_filters:
        return groups(name)
    by_module = {module: groups(f"{name}.{module}") for module in MODULES}
    return [item.model_dump(exclude_none=True) for item in per_module(**by_module)]


def suggest_recipe(trial: optuna.Trial, config: SearchConfig, num_layers: int) -> dict:
    """One merge recipe (a dict that merges.recipe.parse_recipe accepts) for this trial, built from the method's
    row of the method table: its searched parameters (each with the table's range), its roles and its seed."""
    name = trial.suggest_categorical("method", config.methods)
    method = METHODS[name]

    def draw(param: Param, scope: str) -> Any:
        assert param.search is not None
        key, low, high = f"{name}.{scope}{param.name}", param.search.low, param.search.high
        return (
            coefficient(trial, key, low, high, config, num_layers)
            if param.search.layered
            else trial.suggest_float(key, low, high)
        )

    searched = searched_params(name)
    recipe: dict[str, Any] = {"merge_method": name}
    if method.max_models == 1:  # one path between the aligned model and the (single) expert
        recipe["base_model"], roles = ALIGNED_ROLE, [ALIGNED_ROLE, next(iter(config.models.experts))]
    elif method.base == "input":  # linear, karcher: a mix of the listed models, so the (unaligned) base stays out
        roles = list(config.models.merged_roles())
    else:
        recipe["base_model"], roles = BASE_ROLE, list(config.models.merged_roles())
    shared = {param.name: draw(param, "") for param in searched if not param.per_model}
    if shared:
        recipe["parameters"] = shared
    if method.role_weights or method.needs_alignment:
        recipe["alignment_model"] = ALIGNED_ROLE
    if method.role_weights:  # one weight per role (the alignment vector's, the domain vectors'), not per model
        by_role = {param.name: draw(param, "") for param in searched if param.per_model}
        role_of = lambda model: "alignment" if model == ALIGNED_ROLE else "domain"  # noqa: E731
        recipe["models"] = [
            {
                "model": model,
                "parameters": {method.role_weights[role_of(model)]: by_role[method.role_weights[role_of(model)]]},
            }
            for model in roles
        ]
    else:
        recipe["models"] = [
            {"model": model}
            if model == recipe.get("base_model")
            else {
                "model": model,
                "parameters": {param.name: draw(param, f"{model}.") for param in searched if param.per_model},
            }
            for model in roles
        ]
    if method.random:
        recipe["seed"] = config.seed
    return recipe


class _StandardTrial:
    """Answers the search space's suggestions with one method's standard values (the table's) and records them,
    so the warm-start points carry exactly the parameter names `suggest_recipe` asks for."""

    def __init__(self, method: str) -> None:
        self.method, self.params = method, {}
        self.standard = {param.name: param.search.standard for param in searched_params(method) if param.search}

    def suggest_categorical(self, name: str, choices: list) -> Any:
        self.params[name] = self.method
        return self.method

    def suggest_float(self, name: str, low: float, high: float) -> float:
        value = next(self.standard[part] for part in name.split(".")[1:] if part in self.standard)
        self.params[name] = min(max(value, low), high)
        return self.params[name]


def standard_points(config: SearchConfig, num_layers: int) -> list[dict[str, Any]]:
    """The search's warm start: one point per candidate method, its standard uniform recipe (the merge a
    practitioner tries first), as Optuna parameters."""
    points = []
    for method in config.methods:
        trial = _StandardTrial(method)
        suggest_recipe(trial, config, num_layers)  # type: ignore[arg-type]
        points.append(trial.params)
    return points


def standard_recipe(config: SearchConfig, method: str, num_layers: int) -> dict:
    """One method's standard recipe as a practitioner writes it (one number per model, no layer gradient or
    module filter): the baseline a search's pick has to beat (task arithmetic at weights 1/1)."""
    plain = config.model_copy(update={"layer_groups": 1, "module_filters": False})
    return suggest_recipe(_StandardTrial(method), plain, num_layers)  # type: ignore[arg-type]


GRID_WEIGHTS = (0.2, 0.4, 0.6, 0.8, 1.0)
GRID_DENSITIES = (0.2, 0.4, 0.6, 0.8, 1.0)


def grid_recipe(trial: optuna.Trial, config: SearchConfig, num_layers: int) -> dict:
    """The paper's grid baseline: TIES with one weight and one density for every model and layer."""
    weight = trial.suggest_float("grid.weight", GRID_WEIGHTS[0], GRID_WEIGHTS[-1])
    density = trial.suggest_float("grid.density", GRID_DENSITIES[0], GRID_DENSITIES[-1])
    return {
        "merge_method": "ties",
        "base_model": BASE_ROLE,
        "models": [
            {"model": model, "parameters": {"weight": weight, "density": density}}
            for model in config.models.merged_roles()
        ],
    }


GRID_SPACE = {"grid.weight": list(GRID_WEIGHTS), "grid.density": list(GRID_DENSITIES)}
