"""safemerge against mergekit, the oracle: `safemerge merge` and `mergekit-yaml` on the same YAML, and recipes exported
as mergekit YAML, must give the same tensors (1e-5 relative) on the zoo models, with gradients and filters."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from safemerge.cli import main as safemerge
from safemerge.errors import UserError
from safemerge.merges.engine import MergeEngine
from safemerge.merges.methods import TASK_ARITHMETIC_FAMILY, Sparsification
from safemerge.merges.recipe import Recipe, parse_recipe, per_layer, per_module, to_mergekit_yaml

MERGEKIT = str(Path(sys.executable).parent / "mergekit-yaml")
EXPERTS = ("aligned", "medical", "finance")


def yaml_cases(zoo: Path) -> dict[str, dict]:
    """Hand-written mergekit configs: every deterministic method, with scalars, gradients, filter lists and top-level
    parameters in the places mergekit users put them."""
    base, aligned, medical, finance = (str(zoo / name) for name in ("base", *EXPERTS))
    return {
        "linear": {
            "merge_method": "linear",
            "models": [
                {"model": base, "parameters": {"weight": 0.5}},
                {"model": aligned, "parameters": {"weight": [1.0, 0.2, 0.5]}},
                {
                    "model": medical,
                    "parameters": {
                        "weight": [{"filter": "self_attn", "value": 0.3}, {"filter": "mlp", "value": [0.1, 0.9]}]
                    },
                },
            ],
            "parameters": {"weight": 0.7},  # medical's norms, embeddings and lm_head fall through to this
            "dtype": "float32",
        },
        "task_arithmetic": {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "models": [
                {"model": aligned, "parameters": {"weight": [0.3, 1.2]}},
                {"model": medical, "parameters": {"weight": 0.8}},
                {"model": finance, "parameters": {"weight": [{"filter": "mlp", "value": -0.2}, {"value": 0.4}]}},
            ],
            "parameters": {"lambda": 0.9, "normalize": False},
            "dtype": "float32",
        },
        "ties": {
            "merge_method": "ties",
            "base_model": base,
            "models": [
                {"model": base},
                {"model": aligned, "parameters": {"density": [0.2, 0.9], "weight": 0.6}},
                {"model": medical, "parameters": {"density": [{"filter": "self_attn", "value": 0.3}, {"value": 0.7}]}},
                {"model": finance, "parameters": {"weight": [{"filter": "mlp", "value": -0.3}], "density": 0.5}},
            ],
            "parameters": {"weight": 0.5, "normalize": True, "int8_mask": True},
            "dtype": "float32",
        },
        "breadcrumbs": {
            "merge_method": "breadcrumbs",
            "base_model": base,
            "models": [
                {"model": aligned, "parameters": {"weight": 0.7, "density": 0.6, "gamma": [0.02, 0.1]}},
                {"model": medical, "parameters": {"weight": [0.2, 0.9], "density": 0.8}},
            ],
            "parameters": {"rescale": True},
            "dtype": "float32",
        },
        "breadcrumbs_ties": {
            "merge_method": "breadcrumbs_ties",
            "base_model": base,
            "models": [
                {
                    "model": aligned,
                    "parameters": {"weight": 1.0, "density": [{"filter": "mlp", "value": 0.5}, {"value": 0.8}]},
                },
                {"model": medical, "parameters": {"weight": 0.6, "density": 0.7, "gamma": 0.05}},
                {"model": finance, "parameters": {"weight": 0.4, "density": 0.9}},
            ],
            "parameters": {"normalize": True},
            "dtype": "float32",
        },
        "slerp": {
            "merge_method": "slerp",
            "base_model": base,
            "models": [{"model": base}, {"model": aligned}],
            "parameters": {
                "t": [
                    {"filter": "self_attn", "value": [0.0, 0.5, 0.3, 0.7, 1.0]},
                    {"filter": "mlp", "value": [1.0, 0.5, 0.7, 0.3, 0.0]},
                    {"value": 0.5},
                ]
            },
            "dtype": "float32",
        },
        "nuslerp": {
            "merge_method": "nuslerp",
            "base_model": base,
            "models": [
                {"model": aligned, "parameters": {"weight": [0.2, 1.0]}},
                {"model": medical, "parameters": {"weight": 0.6}},
            ],
            "dtype": "float32",
        },
        "nuslerp_row_wise": {
            "merge_method": "nuslerp",
            "models": [
                {"model": aligned, "parameters": {"weight": 0.3}},
                {"model": medical, "parameters": {"weight": [{"filter": "mlp", "value": 0.9}, {"value": 0.5}]}},
            ],
            "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
            "dtype": "float32",
        },
        "model_stock": {
            "merge_method": "model_stock",
            "base_model": base,
            "models": [{"model": aligned}, {"model": medical}, {"model": finance}],
            "dtype": "float32",
        },
        **whole_tensor_cases(base, aligned, medical, finance),
    }


def whole_tensor_cases(base: str, aligned: str, medical: str, finance: str) -> dict[str, dict]:
    """The methods that need figures of a whole tensor (a cut, a count, a quantile, an iteration on norms), which
    the engine must get the same when it merges a tensor in row chunks."""
    return {
        "multislerp": {
            "merge_method": "multislerp",
            "base_model": base,
            "models": [
                {"model": aligned, "parameters": {"weight": [0.2, 1.0]}},
                {"model": medical, "parameters": {"weight": 0.6}},
                {"model": finance, "parameters": {"weight": [{"filter": "mlp", "value": 0.3}, {"value": 0.5}]}},
            ],
            "dtype": "float32",
        },
        "multislerp_without_base": {
            "merge_method": "multislerp",
            "models": [
                {"model": aligned, "parameters": {"weight": 0.3}},
                {"model": medical, "parameters": {"weight": 0.7}},
            ],
            "parameters": {"normalize_weights": False},
            "dtype": "float32",
        },
        "karcher": {
            "merge_method": "karcher",
            "base_model": base,
            "models": [{"model": aligned}, {"model": medical}, {"model": finance}],
            "parameters": {"max_iter": 20, "tol": 1e-6},
            "dtype": "float32",
        },
        "nearswap": {
            "merge_method": "nearswap",
            "base_model": base,
            "models": [{"model": base}, {"model": medical}],
            "parameters": {"t": [0.0005, 0.003]},
            "dtype": "float32",
        },
        "arcee_fusion": {
            "merge_method": "arcee_fusion",
            "base_model": base,
            "models": [{"model": base}, {"model": medical}],
            "dtype": "float32",
        },
        "sce": {
            "merge_method": "sce",
            "base_model": base,
            "models": [{"model": aligned}, {"model": medical}, {"model": finance}],
            "parameters": {"select_topk": [0.3, 0.8], "int8_mask": True},
            "dtype": "float32",
        },
        "sce_every_element": {
            "merge_method": "sce",
            "base_model": base,
            "models": [{"model": aligned}, {"model": medical}],
            "dtype": "float32",
        },
        "ram": {
            "merge_method": "ram",
            "base_model": base,
            "models": [{"model": aligned}, {"model": medical}, {"model": finance}],
            "parameters": {"epsilon": 2e-3},  # the zoo's changes are ~2e-3: some elements changed by one model only
            "dtype": "float32",
        },
        "ramplus_tl": {
            "merge_method": "ramplus_tl",
            "base_model": base,
            "models": [{"model": aligned}, {"model": medical}],
            "parameters": {"epsilon": 1e-3, "r": 0.5, "alpha": [0.1, 0.4]},
            "dtype": "float32",
        },
    }


def export_cases(num_layers: int) -> dict[str, Recipe]:
    """Recipes as the search writes them (per layer group, per module) over engine model names."""
    return {
        "export_ties_groups": parse_recipe(
            {
                "merge_method": "ties",
                "base_model": "base",
                "models": [
                    {
                        "model": "aligned",
                        "parameters": {
                            "weight": _dump(
                                per_module(per_layer([0.9, 0.4], num_layers), per_layer([0.2, 1.1], num_layers), 0.7)
                            ),
                            "density": per_layer([0.3, 0.8], num_layers),
                        },
                    },
                    {
                        "model": "medical",
                        "parameters": {"weight": per_layer([1.0, 0.5, 0.2, 0.6], num_layers), "density": 0.5},
                    },
                ],
            }
        ),
        "export_mergealign": parse_recipe(
            {
                "merge_method": "mergealign",
                "base_model": "base",
                "alignment_model": "aligned",
                "models": [
                    {"model": "aligned", "parameters": {"lambda_align": per_layer([1.0, 0.6], num_layers)}},
                    {"model": "medical"},
                    {"model": "finance", "parameters": {"lambda_domain": _dump(per_module(mlp=0.9))}},
                ],
                "parameters": {"lambda_domain": 0.5},
            }
        ),
        # RESTA's safety vector, exported as mergekit's dare_linear; at density 1 the DARE keeps every element.
        "export_safety_vector": parse_recipe(
            {
                "merge_method": "safety_vector",
                "base_model": "base",
                "alignment_model": "aligned",
                "models": [{"model": "aligned"}, {"model": "medical"}],
                "parameters": {
                    "lambda_safety": _dump(per_module(per_layer([0.3, 1.2], num_layers), 0.8, 0.5)),
                    "density": 1.0,
                },
            }
        ),
        # The search's SLERP runs from the aligned model to an expert: a base other than the engine's.
        "export_slerp_aligned_to_medical": parse_recipe(
            {
                "merge_method": "slerp",
                "base_model": "aligned",
                "models": [{"model": "aligned"}, {"model": "medical"}],
                "parameters": {
                    "t": _dump(
                        per_module(per_layer([0.1, 0.9], num_layers), 0.4, per_layer([0.6, 0.3, 0.2], num_layers))
                    )
                },
            }
        ),
    }


def _dump(filters) -> list[dict]:
    return [item.model_dump(exclude_none=True) for item in filters]


def run_mergekit(config: Path, out: Path) -> None:
    result = subprocess.run(
        [MERGEKIT, str(config), str(out), "--no-cuda", "--quiet", "--copy-tokenizer", "--no-write-model-card"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def engine(zoo_dir: Path) -> MergeEngine:
    return MergeEngine(zoo_dir / "base", {name: zoo_dir / name for name in EXPERTS}, device="cpu")


@pytest.fixture(scope="module")
def oracle(zoo_dir: Path, engine: MergeEngine, tmp_path_factory) -> dict[str, Path]:
    """Run mergekit-yaml once per case (two at a time): case name -> (config path, mergekit output folder)."""
    work = tmp_path_factory.mktemp("mergekit")
    configs = {name: yaml.safe_dump(config) for name, config in yaml_cases(zoo_dir).items()}
    paths = {name: str(zoo_dir / name) for name in ("base", *EXPERTS)}
    for name, recipe in export_cases(engine.num_layers).items():
        configs[name] = to_mergekit_yaml(recipe, paths)
    jobs = {}
    for name, text in configs.items():
        (work / f"{name}.yaml").write_text(text)
        jobs[name] = (work / f"{name}.yaml", work / f"{name}-mergekit")
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(lambda job: run_mergekit(*job), jobs.values()))
    return jobs


def tied_at_cuts(engine: MergeEngine, recipe: Recipe) -> dict[str, torch.Tensor]:
    """Per tensor, the elements whose magnitude equals one of the recipe's magnitude cuts (TIES, breadcrumbs) for
    some model: which of several tied elements a cut keeps is a tie-break (safemerge: the earliest in flat order;
    mergekit: torch's sort order), not arithmetic. A zoo trained on another CPU may have such a tie, or not."""
    family = TASK_ARITHMETIC_FAMILY.get(recipe.merge_method)
    kind = family.sparsification if family is not None else Sparsification.none
    if kind not in (Sparsification.magnitude, Sparsification.breadcrumbs):
        return {}
    tied = {}
    for plan in engine.plan(recipe):
        mask = torch.zeros(engine.shapes[plan.name], dtype=torch.bool)
        for model, values in plan.per_model.items():
            if values.get("density", 1.0) >= 1:
                continue
            magnitudes = engine.task_vector(model, plan.name).abs().cpu()
            total = magnitudes.numel()
            if kind == Sparsification.magnitude:
                counts = [max(1, int(values["density"] * total))]
            else:  # as merges/methods/sparsify.py's breadcrumbs: keep ranks between two cuts
                keep, outliers = int(values["density"] * total), int(values["gamma"] * total)
                smallest = max(0, total - keep - outliers)
                counts = [total - smallest, total - smallest - keep]
            ordered = magnitudes.reshape(-1).sort(descending=True).values
            for count in counts:  # a cut at 0 keeps zeros or not, which adds nothing either way
                if 0 < count < total and ordered[count - 1] > 0:
                    mask |= magnitudes == ordered[count - 1]
        tied[plan.name] = mask
    return tied


def assert_same_tensors(
    actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], tie_breaks: dict[str, torch.Tensor]
) -> None:
    """Equal within 1e-5 relative, except at elements tied at a magnitude cut (`tie_breaks`), which may differ."""
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        ours = actual[name].cpu()
        if name in tie_breaks:
            # The tie-breaks differ at most in which tied elements are kept: compare the rest.
            tied = tie_breaks[name]
            assert int(tied.sum()) <= max(8, tied.numel() // 1000), (name, int(tied.sum()))
            ours, tensor = ours[~tied], tensor[~tied]
        # 1e-5 relative; the absolute floor covers elements where base and delta nearly cancel.
        torch.testing.assert_close(ours, tensor, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def read_model(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


@pytest.mark.parametrize("case", list(yaml_cases(Path("zoo"))))
def test_safemerge_merge_equals_mergekit(case, oracle, engine, tmp_path):
    config, mergekit_out = oracle[case]
    ours = tmp_path / "safemerge"
    assert safemerge(["merge", str(config), str(ours), "--device", "cpu"]) == 0
    # The same YAML over the engine's model names (an empty zoo path), for the recipe's cuts.
    tie_breaks = tied_at_cuts(engine, parse_recipe(yaml_cases(Path(""))[case]))
    assert_same_tensors(read_model(ours), read_model(mergekit_out), tie_breaks)
    ours_config = json.loads((ours / "config.json").read_text())
    theirs_config = json.loads((mergekit_out / "config.json").read_text())
    assert ours_config["architectures"] == theirs_config["architectures"]
    assert ours_config["num_hidden_layers"] == theirs_config["num_hidden_layers"]
    for file_name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (ours / file_name).read_bytes() == (mergekit_out / file_name).read_bytes(), file_name


@pytest.mark.parametrize("case", list(whole_tensor_cases("base", *EXPERTS)))
def test_a_tensor_merged_in_row_chunks_equals_mergekit(case, oracle, zoo_dir):
    """The same recipes with every tensor of the zoo merged in chunks of a few rows: whole-tensor figures (SCE's
    variance cut and weights, RAM+'s counts, arcee_fusion's quartiles) come from passes over the chunks."""
    _, mergekit_out = oracle[case]
    recipe = parse_recipe(yaml_cases(Path(""))[case])
    reference = recipe.base_model or recipe.models[0].model
    others = {entry.model: zoo_dir / entry.model for entry in recipe.models if entry.model != reference}
    engine = MergeEngine(zoo_dir / reference, others, base_name=reference, device="cpu", chunk_elements=3000)
    assert max(len(ranges) for ranges in engine._chunks.values()) > 30  # the embeddings: 800 rows of 128
    assert_same_tensors(engine.merge(recipe), read_model(mergekit_out), {})


@pytest.mark.parametrize("case", list(export_cases(4)))
def test_exported_recipe_reproduces_the_in_memory_merge(case, oracle, engine):
    _, mergekit_out = oracle[case]
    recipe = export_cases(engine.num_layers)[case]
    assert_same_tensors(engine.merge(recipe), read_model(mergekit_out), tied_at_cuts(engine, recipe))


def test_sparsifying_method_around_another_base_is_refused(engine):
    recipe = parse_recipe(
        {"merge_method": "ties", "base_model": "aligned", "models": [{"model": "medical", "parameters": {"weight": 1}}]}
    )
    with pytest.raises(UserError, match="use base_model 'base'"):
        engine.merge(recipe)


def test_mergealign_is_base_plus_weighted_domain_and_alignment_vectors(engine):
    """MergeAlign by its formula: per-layer lambda_align on the alignment vector, lambda_domain on domain vectors."""
    recipe = export_cases(engine.num_layers)["export_mergealign"]
    merged = engine.merge(recipe)
    lambda_align = per_layer([1.0, 0.6], engine.num_layers)
    for layer in range(engine.num_layers):
        for module, finance_lambda in (("mlp.up_proj", 0.9), ("self_attn.q_proj", 0.5)):
            name = f"model.layers.{layer}.{module}.weight"
            vectors = {model: engine.task_vector(model, name) for model in EXPERTS}
            expected = (
                engine.base_tensor(name)
                + lambda_align[layer] * vectors["aligned"]
                + 0.5 * vectors["medical"]
                + finance_lambda * vectors["finance"]
            )
            torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)


def test_safety_vector_adds_a_dare_sparsified_alignment_vector_to_the_expert(engine):
    """safety_vector by its formula (RESTA): expert + lambda_safety * DARE(aligned - base), the kept elements
    rescaled by one factor per tensor, the expert's task vector as it is."""
    recipe = parse_recipe(
        {
            "merge_method": "safety_vector",
            "base_model": "base",
            "alignment_model": "aligned",
            "models": [{"model": "aligned"}, {"model": "medical"}],
            "parameters": {"lambda_safety": 0.7, "density": 0.4},
            "seed": 5,
        }
    )
    merged = engine.merge(recipe)
    for name in ("model.layers.0.mlp.up_proj.weight", "model.embed_tokens.weight"):
        alignment = engine.task_vector("aligned", name)
        residual = merged[name] - engine.base_tensor(name) - engine.task_vector("medical", name)
        kept, changed = residual.abs() > 1e-7, alignment.abs() > 1e-7  # (the zoo leaves unused tokens' rows)
        assert 0.35 < float((kept & changed).sum() / changed.sum()) < 0.45, name  # about `density` of them
        # One factor on every kept element: lambda times DARE's rescale (an L1 ratio, near 1 / density).
        factor = float((residual[kept] / alignment[kept]).median())
        torch.testing.assert_close(residual[kept], factor * alignment[kept], rtol=1e-4, atol=1e-7)
        assert 0.7 / 0.4 * 0.8 < factor < 0.7 / 0.4 * 1.2, name
        assert float(residual[~kept].abs().max()) < 1e-6


def test_selective_layers_moves_only_the_layers_that_drift_from_the_alignment_vector(engine, zoo_dir, tmp_path):
    """selective_layers by its rule (SafeMERGE from weights): the layers whose medical task vector has a cosine
    under the threshold with the alignment vector take medical + mix * (aligned - medical), the others and the
    tensors outside the layers stay medical's; its mergekit export (task_arithmetic) merges to the same tensors."""
    cosines = engine.layer_cosines("medical", "aligned")
    ordered = sorted(cosines)
    threshold = (ordered[1] + ordered[2]) / 2  # (from this zoo's cosines: two layers selected, the others not)
    recipe = parse_recipe(
        {
            "merge_method": "selective_layers",
            "base_model": "base",
            "alignment_model": "aligned",
            "models": [{"model": "aligned"}, {"model": "medical"}],
            "parameters": {"threshold": threshold, "mix": 0.6},
        }
    )
    merged = engine.merge(recipe)
    for name, tensor in merged.items():
        layer = next((i for i in range(engine.num_layers) if f"layers.{i}." in name), None)
        medical = engine.base_tensor(name) + engine.task_vector("medical", name)
        aligned = engine.base_tensor(name) + engine.task_vector("aligned", name)
        expected = medical + 0.6 * (aligned - medical) if layer is not None and cosines[layer] < threshold else medical
        torch.testing.assert_close(tensor, expected, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    paths = {name: str(zoo_dir / name) for name in ("base", *EXPERTS)}
    (tmp_path / "selective.yaml").write_text(to_mergekit_yaml(recipe, paths, engine.layer_cosines))
    run_mergekit(tmp_path / "selective.yaml", tmp_path / "mergekit")
    assert_same_tensors(merged, read_model(tmp_path / "mergekit"), {})
    with pytest.raises(UserError, match="safemerge merge"):  # without the weights the layers are unknown
        to_mergekit_yaml(recipe, paths)


def test_passthrough_stacks_slices_as_mergekit_does(zoo_dir, tmp_path):
    """passthrough: layers 0-1 of the base then 1-3 of the medical expert, a 5-layer model, equal to mergekit-yaml's
    and loadable by transformers."""
    config = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(zoo_dir / "base"), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(zoo_dir / "medical"), "layer_range": [1, 4]}]},
        ],
        "dtype": "float32",
    }
    (tmp_path / "stack.yaml").write_text(yaml.safe_dump(config))
    ours = tmp_path / "safemerge"
    assert safemerge(["merge", str(tmp_path / "stack.yaml"), str(ours)]) == 0
    run_mergekit(tmp_path / "stack.yaml", tmp_path / "mergekit")
    assert_same_tensors(read_model(ours), read_model(tmp_path / "mergekit"), {})
    assert json.loads((ours / "config.json").read_text())["num_hidden_layers"] == 5
    base, medical = read_model(zoo_dir / "base"), read_model(zoo_dir / "medical")
    stacked = read_model(ours)
    name = "model.layers.{}.mlp.down_proj.weight"
    assert torch.equal(stacked[name.format(1)], base[name.format(1)])
    assert torch.equal(stacked[name.format(2)], medical[name.format(1)])
    assert torch.equal(stacked["lm_head.weight"], medical["lm_head.weight"])
    assert torch.equal(stacked["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(ours).config.num_hidden_layers == 5
    assert yaml.safe_load((ours / "mergekit_config.yml").read_text()) == config
