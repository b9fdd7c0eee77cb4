"""The search space and its samplers, driven by a real in-memory Optuna study: every proposal is a valid recipe,
coefficients are conditional on the method, warm-start points are each method's standard recipe, and a resumed
search does not replay its first proposals."""

from __future__ import annotations

import optuna
import pytest

from safemerge.merges.methods import searchable_methods, searched_params, sparsifies
from safemerge.merges.recipe import parse_recipe
from safemerge.search.samplers import SAMPLER_NAMES, make_sampler
from safemerge.search.space import (
    GRID_DENSITIES,
    GRID_WEIGHTS,
    grid_recipe,
    standard_points,
    suggest_recipe,
)

from .support import make_config

SEARCHABLE_METHODS = searchable_methods()

SAMPLER_CLASSES = {
    "nsga2": optuna.samplers.NSGAIISampler,
    "tpe": optuna.samplers.TPESampler,
    "gp": optuna.samplers.GPSampler,
    "random": optuna.samplers.RandomSampler,
    "grid": optuna.samplers.GridSampler,
    "cmaes": optuna.samplers.CmaEsSampler,
}
CMAES = {"sampler": "cmaes", "objectives.maximize": [], "objectives.minimize": ["combined"]}
TWO_EXPERTS = {"models.experts": {"medical": "zoo:medical", "finance": "zoo:finance"}}


def sampler_config(name: str, **overrides):
    return make_config(**(CMAES if name == "cmaes" else {"sampler": name}), **overrides)


def random_study(seed: int = 0) -> optuna.Study:
    return optuna.create_study(directions=["maximize", "maximize"], sampler=optuna.samplers.RandomSampler(seed=seed))


def leaves(setting) -> list:
    """Every number a recipe parameter holds: a scalar, a per-layer list, or a filtered list of those."""
    if isinstance(setting, dict):
        return leaves(setting["value"])
    if isinstance(setting, list):
        return [value for item in setting for value in leaves(item)]
    return [setting]


# Samplers.


def test_every_sampler_the_config_accepts_is_built_as_its_kind():
    assert set(SAMPLER_NAMES) == set(SAMPLER_CLASSES)  # a new sampler needs its row here
    assert SAMPLER_NAMES[0] == make_config().sampler == "tpe"  # the first is the default
    for name in SAMPLER_NAMES:
        config = sampler_config(name)
        assert config.sampler == name
        assert isinstance(make_sampler(config), SAMPLER_CLASSES[name]), name


def proposals(config, trials_so_far: int, count: int = 3) -> list[dict]:
    study = optuna.create_study(
        directions=config.objectives.directions(), sampler=make_sampler(config, trials_so_far=trials_so_far)
    )
    found = []
    for _ in range(count):
        trial = study.ask()
        suggest_recipe(trial, config, num_layers=4)
        found.append(trial.params)
    return found


def test_the_same_seed_proposes_the_same_recipes_and_a_resumed_search_new_ones():
    config = make_config(sampler="random", seed=3)
    first = proposals(config, trials_so_far=0)
    assert proposals(config, trials_so_far=0) == first
    assert proposals(make_config(sampler="random", seed=4), trials_so_far=0) != first
    resumed = proposals(config, trials_so_far=5)
    assert resumed != first
    assert not {tuple(sorted(p.items())) for p in resumed} & {tuple(sorted(p.items())) for p in first}
    assert proposals(config, trials_so_far=5) == resumed  # a resume is reproducible too


# The space.


@pytest.mark.parametrize("method", SEARCHABLE_METHODS)
@pytest.mark.parametrize("layer_groups, module_filters", [(1, False), (1, True), (3, False), (3, True)])
def test_every_method_proposes_a_valid_recipe_with_its_own_parameters(method, layer_groups, module_filters):
    num_layers = 6
    config = make_config(methods=[method], layer_groups=layer_groups, module_filters=module_filters)
    searched = {param.name: param for param in searched_params(method)}
    layered = any(param.search.layered for param in searched.values())
    study = random_study()
    for _ in range(3):
        trial = study.ask()
        recipe = suggest_recipe(trial, config, num_layers)
        parsed = parse_recipe(recipe, source=f"{method} proposal")
        assert parsed.merge_method == method == trial.params["method"]
        names = set(trial.params) - {"method"}
        assert all(name.split(".")[0] == method for name in names)  # coefficients are conditional on the method
        assert all(set(name.split(".")[1:]) & set(searched) for name in names)  # each names a searched parameter
        assert any(name.endswith(f".g{layer_groups - 1}") for name in names) == layered
        assert not any(name.endswith(f".g{layer_groups}") for name in names)
        assert any(".self_attn." in name for name in names) == (module_filters and layered)
        assert any(".mlp." in name for name in names) == (module_filters and layered)
        model_densities = {f"{method}.{entry['model']}.density" for entry in recipe["models"]}
        assert bool(names & model_densities) == sparsifies(method)
        for entry in recipe["models"]:
            assert ("density" in entry.get("parameters", {})) == sparsifies(method)
        scopes = [recipe.get("parameters", {}), *(entry.get("parameters", {}) for entry in recipe["models"])]
        found = {name for scope in scopes for name in scope}
        assert found == set(searched), (method, found)  # every searched parameter reaches the recipe, no other
        for scope in scopes:
            for name, setting in scope.items():
                search = searched[name].search
                assert all(search.low <= value <= search.high for value in leaves(setting)), (method, name)


def test_sparsifying_methods_get_one_density_per_model_and_plain_ones_none():
    config = make_config(methods=["ties", "task_arithmetic"], **TWO_EXPERTS)
    study = random_study(seed=2)
    seen = set()
    for _ in range(12):
        trial = study.ask()
        recipe = suggest_recipe(trial, config, num_layers=4)
        method = recipe["merge_method"]
        seen.add(method)
        densities = sorted(name for name in trial.params if name.endswith(".density"))
        if method == "ties":
            assert densities == ["ties.aligned.density", "ties.finance.density", "ties.medical.density"]
        else:
            assert densities == []
    assert seen == {"ties", "task_arithmetic"}


def test_a_per_layer_group_coefficient_holds_its_value_on_every_layer_of_its_group():
    config = make_config(methods=["task_arithmetic"], layer_groups=3, module_filters=True)
    trial = random_study(seed=1).ask()
    recipe = suggest_recipe(trial, config, num_layers=6)
    groups_of_layers = [0, 0, 1, 1, 2, 2]  # 6 layers in 3 contiguous groups
    for entry in recipe["models"]:
        weight = entry["parameters"]["weight"]
        assert [item.get("filter") for item in weight] == ["self_attn", "mlp", None]
        for item, module in zip(weight, ("self_attn", "mlp", "other"), strict=True):
            assert len(item["value"]) == 6
            prefix = f"task_arithmetic.{entry['model']}.weight.{module}"
            assert item["value"] == [trial.params[f"{prefix}.g{group}"] for group in groups_of_layers]
    assert [entry["model"] for entry in recipe["models"]] == ["aligned", "medical"]
    assert recipe["base_model"] == "base"


def test_one_group_without_module_filters_is_one_scalar_per_model():
    config = make_config(methods=["task_arithmetic"], layer_groups=1, module_filters=False)
    trial = random_study().ask()
    recipe = suggest_recipe(trial, config, num_layers=4)
    assert [entry["parameters"]["weight"] for entry in recipe["models"]] == [
        trial.params["task_arithmetic.aligned.weight.g0"],
        trial.params["task_arithmetic.medical.weight.g0"],
    ]


def test_slerp_goes_from_the_aligned_model_to_the_expert():
    config = make_config(methods=["slerp"], layer_groups=2, module_filters=False)
    trial = random_study().ask()
    recipe = suggest_recipe(trial, config, num_layers=4)
    assert recipe["base_model"] == "aligned"
    assert [entry["model"] for entry in recipe["models"]] == ["aligned", "medical"]
    t = recipe["parameters"]["t"]
    assert t == [trial.params["slerp.t.g0"]] * 2 + [trial.params["slerp.t.g1"]] * 2
    assert all(0.0 <= value <= 1.0 for value in t)


def test_mergealign_weighs_the_alignment_vector_and_the_domain_vectors_apart():
    config = make_config(methods=["mergealign"], layer_groups=1, module_filters=False, **TWO_EXPERTS)
    trial = random_study().ask()
    recipe = suggest_recipe(trial, config, num_layers=4)
    parse_recipe(recipe)
    assert recipe["alignment_model"] == "aligned" and recipe["base_model"] == "base"
    assert recipe["models"] == [
        {"model": "aligned", "parameters": {"lambda_align": trial.params["mergealign.lambda_align.g0"]}},
        {"model": "medical", "parameters": {"lambda_domain": trial.params["mergealign.lambda_domain.g0"]}},
        {"model": "finance", "parameters": {"lambda_domain": trial.params["mergealign.lambda_domain.g0"]}},
    ]


@pytest.mark.parametrize("module_filters", [False, True])
def test_warm_start_points_reproduce_each_methods_standard_recipe(module_filters):
    methods = list(SEARCHABLE_METHODS)
    config = make_config(methods=methods, layer_groups=2, module_filters=module_filters)
    points = standard_points(config, num_layers=4)
    assert [point["method"] for point in points] == methods
    study = random_study(seed=7)
    for point in points:
        study.enqueue_trial(point)
    for point in points:
        trial = study.ask()
        recipe = suggest_recipe(trial, config, num_layers=4)
        parse_recipe(recipe)
        assert trial.params == point  # the point names exactly what the space asks: nothing is sampled
        assert recipe["merge_method"] == point["method"]
        standard = {param.name: param.search.standard for param in searched_params(point["method"])}
        scopes = [recipe.get("parameters", {}), *(entry.get("parameters", {}) for entry in recipe["models"])]
        assert {name for scope in scopes for name in scope} == set(standard), point["method"]
        for scope in scopes:
            for name, setting in scope.items():
                assert set(leaves(setting)) == {standard[name]}, (point["method"], name)
    # The familiar ones, as mergekit's examples write them: every weight and lambda 1, density and t 0.5.
    assert {p.name: p.search.standard for m in ("ties", "slerp", "mergealign") for p in searched_params(m)} == {
        "weight": 1.0,
        "density": 0.5,
        "t": 0.5,
        "lambda_align": 1.0,
        "lambda_domain": 1.0,
    }


def test_the_grid_sampler_covers_the_papers_density_by_weight_grid_with_ties():
    config = make_config(sampler="grid", **TWO_EXPERTS)
    study = optuna.create_study(directions=config.objectives.directions(), sampler=make_sampler(config))
    seen = set()
    for _ in range(len(GRID_WEIGHTS) * len(GRID_DENSITIES)):
        trial = study.ask()
        recipe = grid_recipe(trial, config, num_layers=4)
        parse_recipe(recipe)
        weight, density = trial.params["grid.weight"], trial.params["grid.density"]
        assert recipe["merge_method"] == "ties" and recipe["base_model"] == "base"
        assert [entry["model"] for entry in recipe["models"]] == ["aligned", "medical", "finance"]
        assert all(entry["parameters"] == {"weight": weight, "density": density} for entry in recipe["models"])
        seen.add((weight, density))
    assert seen == {(w, d) for w in GRID_WEIGHTS for d in GRID_DENSITIES}


@pytest.mark.parametrize("method", SEARCHABLE_METHODS)
def test_every_proposal_of_the_space_is_a_recipe_the_engine_accepts(method, engine):
    """The ranges of the method table must give recipes the engine plans, not recipes it refuses with a UserError
    (a failed trial that spends budget): e.g. della's density must keep density +/- epsilon inside (0, 1)."""
    from .support import NUM_LAYERS

    config = make_config(methods=[method], layer_groups=2, module_filters=True)
    study = random_study(seed=1)
    for _ in range(40):
        recipe = suggest_recipe(study.ask(), config, NUM_LAYERS)
        assert engine.plan(parse_recipe(recipe, source=f"{method} proposal"))
