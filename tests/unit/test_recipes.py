"""Merge recipes: mergekit YAML round trips, what a recipe means tensor by tensor on a tiny hand-made family,
and one clear error for each kind of bad recipe."""

from __future__ import annotations

import pytest
import torch
import yaml

from safemerge.errors import UserError
from safemerge.merges.recipe import from_mergekit_yaml, parse_recipe, per_layer, per_module, to_mergekit_yaml
from safemerge.search.trial import single_model_recipe

from .support import OFFSETS, TENSOR_SHAPES, base_tensor

FILTERED_WEIGHT = [
    {"filter": "self_attn", "value": [0.2, 0.8]},
    {"filter": "mlp", "value": 0.5},
    {"value": 1.0},
]
ROUND_TRIPS = {
    "task_arithmetic": {
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "models": [
            {"model": "aligned", "parameters": {"weight": 0.7}},
            {"model": "medical", "parameters": {"weight": 0.3}},
        ],
        "parameters": {"lambda": 0.9},
        "dtype": "float32",
    },
    "ties": {
        "merge_method": "ties",
        "base_model": "base",
        "models": [
            {"model": "aligned", "parameters": {"weight": 1.0, "density": 0.4}},
            {"model": "medical", "parameters": {"weight": [0.5, 1.0], "density": 0.6}},
        ],
        "parameters": {"normalize": False},
    },
    "slerp": {
        "merge_method": "slerp",
        "base_model": "aligned",
        "models": [{"model": "aligned"}, {"model": "medical"}],
        "parameters": {"t": [0.0, 0.5, 1.0]},
    },
    "filtered": {
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "models": [
            {"model": "aligned", "parameters": {"weight": FILTERED_WEIGHT}},
            {"model": "medical", "parameters": {"weight": [{"filter": "mlp", "value": 1.2}, {"value": 0.1}]}},
        ],
    },
    "dare_ties": {
        "merge_method": "dare_ties",
        "base_model": "base",
        "models": [{"model": "medical", "parameters": {"weight": 1.0, "density": 0.5}}],
    },
}


@pytest.mark.parametrize("name", ROUND_TRIPS)
def test_a_recipe_survives_the_round_trip_through_mergekit_yaml(name):
    recipe = parse_recipe(ROUND_TRIPS[name])
    text = to_mergekit_yaml(recipe)
    assert from_mergekit_yaml(text, source=f"{name}.yaml") == recipe
    exported = yaml.safe_load(text)  # what mergekit-yaml reads: the same vocabulary, unchanged
    assert exported["merge_method"] == ROUND_TRIPS[name]["merge_method"]
    assert exported["models"] == [
        {key: value for key, value in entry.items() if key != "parameters" or value}
        for entry in ROUND_TRIPS[name]["models"]
    ]
    assert exported.get("parameters", {}) == ROUND_TRIPS[name].get("parameters", {})


def test_export_writes_model_paths_and_says_how_to_seed_a_random_method():
    recipe = parse_recipe({**ROUND_TRIPS["dare_ties"], "seed": 7})
    text = to_mergekit_yaml(recipe, {"base": "/models/base", "medical": "/models/medical"})
    assert text.startswith("# random method: pass --random-seed to mergekit-yaml (safemerge seed 7)\n")
    exported = yaml.safe_load(text)
    assert exported["base_model"] == "/models/base"
    assert [entry["model"] for entry in exported["models"]] == ["/models/medical"]
    assert not to_mergekit_yaml(parse_recipe(ROUND_TRIPS["ties"])).startswith("#")  # ties is not random


def test_mergealign_exports_as_mergekit_task_arithmetic_with_its_lambdas_as_weights():
    recipe = parse_recipe(
        {
            "merge_method": "mergealign",
            "base_model": "base",
            "alignment_model": "aligned",
            "models": [
                {"model": "aligned", "parameters": {"lambda_align": 0.8}},
                {"model": "medical", "parameters": {"lambda_domain": [0.2, 0.6]}},
            ],
        }
    )
    exported = yaml.safe_load(to_mergekit_yaml(recipe))
    assert exported == {
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "models": [
            {"model": "aligned", "parameters": {"weight": 0.8}},
            {"model": "medical", "parameters": {"weight": [0.2, 0.6]}},
        ],
    }


def test_per_layer_and_per_module_build_what_mergekit_reads():
    assert per_layer([0.1, 0.9], num_layers=4) == [0.1, 0.1, 0.9, 0.9]
    assert per_layer([0.3], num_layers=3) == [0.3, 0.3, 0.3]
    with pytest.raises(UserError, match="layer groups must number 1 to 2"):
        per_layer([0.1, 0.2, 0.3], num_layers=2)
    built = [item.model_dump(exclude_none=True) for item in per_module(self_attn=[0.2, 0.8], mlp=0.5, other=1.0)]
    assert built == FILTERED_WEIGHT


BAD_RECIPE_BASE = {
    "merge_method": "task_arithmetic",
    "base_model": "base",
    "models": [
        {"model": "aligned", "parameters": {"weight": 1.0}},
        {"model": "medical", "parameters": {"weight": 1.0}},
    ],
}
TWO_PLAIN_MODELS = [{"model": "aligned"}, {"model": "medical"}]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"merge_method": "frobnicate"}, "unknown merge_method 'frobnicate'; pick one of"),
        ({"slices": []}, "mergekit key 'slices' is not supported"),
        ({"base_model": None}, "task_arithmetic needs base_model"),
        ({"parameters": {"density_typo": 0.5}}, "unknown parameter 'density_typo' for task_arithmetic"),
        ({"models": [{"model": "aligned", "parameters": {"t": 0.5}}]}, "unknown parameter 't' for model 'aligned'"),
        (
            {"models": [{"model": "aligned", "parameters": {"normalize": True}}]},
            "parameter 'normalize' of task_arithmetic is shared by all models; move it from model 'aligned'",
        ),
        (
            {"models": [{"model": "aligned", "parameters": {"weight": 1.0}}] * 2},
            "a model is listed twice in models",
        ),
        ({"dtype": "int4"}, "dtype 'int4' is not supported"),
        ({"alignment_model": "aligned"}, "alignment_model applies to mergealign and safety_vector only"),
        (
            {"merge_method": "slerp", "parameters": {"t": 0.5}, "models": TWO_PLAIN_MODELS},
            "slerp merges exactly 1 model(s) besides the base, got 2",
        ),
        (
            {
                "merge_method": "mergealign",
                "models": [
                    {"model": "aligned", "parameters": {"lambda_align": 1.0}},
                    {"model": "medical", "parameters": {"lambda_domain": 1.0}},
                ],
            },
            "mergealign needs alignment_model set to one of the models",
        ),
        ({"models": "aligned"}, "models: Input should be a valid list"),
        ({"seeds": 3}, "seeds: Extra inputs are not permitted"),
    ],
)
def test_a_bad_recipe_is_one_error_naming_what_to_fix(change, message):
    with pytest.raises(UserError) as error:
        parse_recipe({**BAD_RECIPE_BASE, **change}, source="my.yaml")
    assert str(error.value).startswith("my.yaml: ")
    assert message in str(error.value)
    assert "\n" not in str(error.value)
    parse_recipe(BAD_RECIPE_BASE, source="my.yaml")  # without the change the recipe is fine


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["weight", "filtered", "gradient", "shared"])
def test_nan_and_inf_are_refused_at_parse_naming_the_parameter(value, where):
    data = {**BAD_RECIPE_BASE, "models": [{"model": "aligned", "parameters": {"weight": 1.0}}]}
    if where == "shared":
        data["parameters"] = {"lambda": value}
    else:
        setting = {"weight": value, "filtered": [{"filter": "mlp", "value": value}], "gradient": [0.5, value]}[where]
        data["models"] = [{"model": "aligned", "parameters": {"weight": setting}}]
    name, scope = ("lambda", "parameters") if where == "shared" else ("weight", "model 'aligned'")
    with pytest.raises(UserError, match=f"^my.yaml: {scope}: parameter '{name}' is {value}; use a finite number$"):
        parse_recipe(data, source="my.yaml")


def test_a_value_of_the_wrong_type_is_refused_even_where_a_filter_shadows_it():
    for weight in ("heavy", [0.5, "heavy"], [{"filter": "mlp", "value": 1.0}, {"value": "heavy"}], True):
        data = {**BAD_RECIPE_BASE, "models": [{"model": "aligned", "parameters": {"weight": weight}}]}
        with pytest.raises(UserError, match="parameter 'weight' must be a number, got"):
            parse_recipe(data, source="my.yaml")


# What a recipe means: the tiny family's aligned model is base + 1 everywhere, medical is base + 2.


def merged(engine, data: dict) -> dict[str, torch.Tensor]:
    return engine.merge(parse_recipe(data))


def test_filtered_weights_reach_the_tensors_their_filter_names(engine):
    result = merged(
        engine,
        {
            "merge_method": "task_arithmetic",
            "base_model": "base",
            "models": [{"model": "aligned", "parameters": {"weight": FILTERED_WEIGHT}}],
        },
    )
    expected_weight = {
        "model.embed_tokens.weight": 1.0,  # outside the layers and not attention or MLP: the unfiltered value
        "model.layers.0.self_attn.q_proj.weight": 0.2,  # a gradient over 2 layers: first value on layer 0
        "model.layers.1.self_attn.q_proj.weight": 0.8,
        "model.layers.0.mlp.up_proj.weight": 0.5,
        "model.layers.1.mlp.up_proj.weight": 0.5,
        "model.norm.weight": 1.0,
    }
    assert set(result) == set(TENSOR_SHAPES)
    for name, weight in expected_weight.items():
        torch.testing.assert_close(result[name], base_tensor(name) + weight * OFFSETS["aligned"], msg=name)


def test_task_arithmetic_adds_each_weighted_task_vector_to_the_base(engine):
    result = merged(engine, ROUND_TRIPS["task_arithmetic"])  # lambda 0.9 * (0.7 * 1 + 0.3 * 2)
    for name in TENSOR_SHAPES:
        torch.testing.assert_close(result[name], base_tensor(name) + 0.9 * (0.7 * 1.0 + 0.3 * 2.0), msg=name)


def test_the_mergekit_yaml_of_a_recipe_merges_to_the_same_tensors(engine):
    recipe = parse_recipe(ROUND_TRIPS["filtered"])
    again = from_mergekit_yaml(to_mergekit_yaml(recipe))
    first, second = engine.merge(recipe), engine.merge(again)
    for name in TENSOR_SHAPES:
        torch.testing.assert_close(first[name], second[name], rtol=0, atol=0)


def test_a_single_model_recipe_scores_that_model_as_it_is(engine):
    result = merged(engine, single_model_recipe("medical"))
    for name in TENSOR_SHAPES:
        torch.testing.assert_close(result[name], base_tensor(name) + OFFSETS["medical"], msg=name)


def test_a_model_outside_the_family_is_refused_before_any_merge(engine):
    data = {**ROUND_TRIPS["task_arithmetic"], "models": [{"model": "finance", "parameters": {"weight": 1.0}}]}
    with pytest.raises(UserError, match="recipe names model 'finance', which this engine does not hold; use one of "):
        engine.merge(parse_recipe(data))


def test_a_missing_weight_names_the_model_and_where_to_add_it(engine):
    data = {**ROUND_TRIPS["task_arithmetic"], "models": [{"model": "aligned"}, {"model": "medical"}]}
    with pytest.raises(UserError) as error:
        engine.merge(parse_recipe(data))
    assert "task_arithmetic needs parameter 'weight' for model 'aligned'" in str(error.value)
    assert "add it to that model's parameters or to the top-level parameters" in str(error.value)
    top_level = {**data, "parameters": {"weight": 0.5}}  # the fix the message names works
    result = engine.merge(parse_recipe(top_level))
    name = "model.norm.weight"
    torch.testing.assert_close(result[name], base_tensor(name) + 0.5 * 1.0 + 0.5 * 2.0)


def test_a_density_outside_its_range_names_the_model(engine):
    data = {**ROUND_TRIPS["ties"]}
    data["models"] = [{"model": "aligned", "parameters": {"weight": 1.0, "density": 1.5}}]
    with pytest.raises(UserError, match="density 1.5 for model 'aligned' .* is outside \\(0, 1\\]"):
        engine.merge(parse_recipe(data))
