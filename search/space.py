"""The search space, define-by-run: one function of an Optuna trial that reads like the recipe it builds.

The method is a categorical choice; every coefficient is conditional on it and varies per model, per layer
group and (optionally) per module filter (self_attn, mlp, everything else), in mergekit's vocabulary, so a
found recipe exports as a mergekit YAML as it is.
"""

from __future__ import annotations

from typing import Any

import optuna

from safemerge.merges.methods import sparsifies
from safemerge.merges.recipe import per_layer, per_module
from safemerge.search.config import ALIGNED_ROLE, BASE_ROLE, SearchConfig

WEIGHT_RANGE = (0.0, 1.5)
DENSITY_RANGE = (0.1, 1.0)
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
    """One merge recipe (a dict that merges.recipe.parse_recipe accepts) for this trial."""
    method = trial.suggest_categorical("method", config.methods)
    experts = list(config.models.experts)

    if method == "slerp":  # one path between the aligned model and the (single) expert
        t = coefficient(trial, "slerp.t", 0.0, 1.0, config, num_layers)
        return {
            "merge_method": "slerp",
            "base_model": ALIGNED_ROLE,
            "parameters": {"t": t},
            "models": [{"model": ALIGNED_ROLE}, {"model": experts[0]}],
        }

    if method == "mergealign":  # base + lambda_domain * domain vectors + lambda_align * alignment vector
        lambda_align = coefficient(trial, "mergealign.lambda_align", *WEIGHT_RANGE, config, num_layers)
        lambda_domain = coefficient(trial, "mergealign.lambda_domain", *WEIGHT_RANGE, config, num_layers)
        return {
            "merge_method": "mergealign",
            "base_model": BASE_ROLE,
            "alignment_model": ALIGNED_ROLE,
            "models": [{"model": ALIGNED_ROLE, "parameters": {"lambda_align": lambda_align}}]
            + [{"model": expert, "parameters": {"lambda_domain": lambda_domain}} for expert in experts],
        }

    models = []
    for model in config.models.merged_roles():
        parameters = {"weight": coefficient(trial, f"{method}.{model}.weight", *WEIGHT_RANGE, config, num_layers)}
        if sparsifies(method):
            parameters["density"] = trial.suggest_float(f"{method}.{model}.density", *DENSITY_RANGE)
        models.append({"model": model, "parameters": parameters})
    return {"merge_method": method, "base_model": BASE_ROLE, "models": models, "seed": config.seed}


# Each method's standard recipe, as mergekit's examples write it: every weight and lambda 1, density and t 0.5.
STANDARD_VALUES = {"weight": 1.0, "density": 0.5, "t": 0.5, "lambda_align": 1.0, "lambda_domain": 1.0}


class _StandardTrial:
    """Answers the search space's suggestions with one method's standard values and records them, so the
    warm-start points carry exactly the parameter names `suggest_recipe` asks for."""

    def __init__(self, method: str) -> None:
        self.method, self.params = method, {}

    def suggest_categorical(self, name: str, choices: list) -> Any:
        self.params[name] = self.method
        return self.method

    def suggest_float(self, name: str, low: float, high: float) -> float:
        value = next(STANDARD_VALUES[part] for part in name.split(".") if part in STANDARD_VALUES)
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
