"""The merge engine as a search worker uses it: random methods reproducible by seed and right in distribution, merges
from memory (files read once), results written into existing buffers, and merged folders that load elsewhere."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from safemerge.errors import UserError
from safemerge.merges.engine import MergeEngine
from safemerge.merges.recipe import parse_recipe

EXPERTS = ("aligned", "medical")
# Big enough tensors for the statistics below: 65536 to 102400 elements each.
STAT_TENSORS = ("model.embed_tokens.weight", "model.layers.1.mlp.up_proj.weight", "model.layers.2.mlp.down_proj.weight")


@pytest.fixture(scope="module")
def engine(zoo_dir: Path) -> MergeEngine:
    return MergeEngine(zoo_dir / "base", {name: zoo_dir / name for name in EXPERTS}, device="cpu")


def recipe(method: str, seed: int = 0, **parameters) -> object:
    models = [{"model": "aligned", "parameters": {"weight": 1.0, "density": 0.3}}]
    if method in ("dare_ties", "della"):
        models.append({"model": "medical", "parameters": {"weight": 0.5, "density": 0.6}})
    return parse_recipe(
        {"merge_method": method, "base_model": "base", "models": models, "parameters": parameters, "seed": seed}
    )


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_random_methods_repeat_with_the_same_seed_and_change_with_another(engine, method):
    first = engine.merge(recipe(method, seed=7))
    again = engine.merge(recipe(method, seed=7))
    other = engine.merge(recipe(method, seed=8))
    for name in STAT_TENSORS:
        assert torch.equal(first[name], again[name]), name
        assert not torch.equal(first[name], other[name]), name


def kept_share(merged: torch.Tensor, base: torch.Tensor, task_vector: torch.Tensor) -> float:
    visible = (base + task_vector) != base  # elements whose change survives fp32 rounding at all
    return float(((merged != base) & visible).sum() / visible.sum())


@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
def test_kept_share_is_the_density(engine, method):
    merged = engine.merge(recipe(method, rescale=False))
    for name in STAT_TENSORS:
        count = engine.base_tensor(name).numel()
        tolerance = 5 * (0.3 * 0.7 / count) ** 0.5  # five standard deviations of a binomial share
        share = kept_share(merged[name], engine.base_tensor(name), engine.task_vector("aligned", name))
        assert abs(share - 0.3) < tolerance, (name, share)


def test_della_keeps_large_magnitudes_more_often(engine):
    name = "model.layers.1.mlp.up_proj.weight"
    merged = engine.merge(recipe("della_linear", rescale=False))[name]
    task_vector = engine.task_vector("aligned", name)
    kept = merged != engine.base_tensor(name)
    ranks = task_vector.abs().argsort(dim=1).argsort(dim=1)
    large = ranks >= task_vector.shape[1] // 2
    # density 0.3, epsilon 0.15: keep probability runs from 0.15 (smallest in a row) to 0.45 (largest).
    assert float(kept[large].float().mean()) == pytest.approx(0.375, abs=0.02)
    assert float(kept[~large].float().mean()) == pytest.approx(0.225, abs=0.02)


@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
def test_rescaling_preserves_the_mean(engine, method):
    merged = engine.merge(recipe(method, rescale=True))
    for name in STAT_TENSORS:
        task_vector = engine.task_vector("aligned", name).double()
        delta = merged[name].double() - engine.base_tensor(name).double()
        # L1 rescaling restores the mean magnitude exactly...
        assert float(delta.abs().mean()) == pytest.approx(float(task_vector.abs().mean()), rel=1e-4)
        # ...and keeps the signed mean within noise: each element adds (mask / p - 1) * x.
        noise = float((task_vector.square() * 0.7 / 0.3).sum().sqrt()) / task_vector.numel()
        assert abs(float(delta.mean() - task_vector.mean())) < 5 * noise, name
    unscaled = engine.merge(recipe(method, rescale=False))
    name = STAT_TENSORS[0]
    shrunk = (unscaled[name] - engine.base_tensor(name)).abs().mean() / engine.task_vector("aligned", name).abs().mean()
    if method == "dare_linear":
        assert float(shrunk) == pytest.approx(0.3, abs=0.02)  # without rescaling the dropped mass is simply gone
    else:
        assert float(shrunk) > 0.33  # della drops small magnitudes more often, so more than 30% of the mass stays


def test_engine_merges_from_memory_after_the_files_are_gone(zoo_dir, engine, tmp_path):
    for name in ("base", *EXPERTS):
        shutil.copytree(zoo_dir / name, tmp_path / name)
    copy = MergeEngine(tmp_path / "base", {name: tmp_path / name for name in EXPERTS}, device="cpu")
    for name in ("base", *EXPERTS):
        shutil.rmtree(tmp_path / name)
    ties = parse_recipe(
        {
            "merge_method": "ties",
            "base_model": "base",
            "models": [{"model": model, "parameters": {"weight": 0.5, "density": 0.4}} for model in EXPERTS],
        }
    )
    expected = engine.merge(ties)
    for name, tensor in copy.merge(ties).items():
        assert torch.equal(tensor, expected[name]), name


def test_merge_writes_into_given_buffers(engine):
    first = parse_recipe(
        {
            "merge_method": "task_arithmetic",
            "base_model": "base",
            "models": [{"model": "aligned", "parameters": {"weight": 1.0}}],
        }
    )
    second = parse_recipe(
        {"merge_method": "slerp", "base_model": "base", "models": [{"model": "medical"}], "parameters": {"t": 0.4}}
    )
    buffers = engine.merge(first)
    pointers = {name: tensor.data_ptr() for name, tensor in buffers.items()}
    result = engine.merge(second, out=buffers)
    fresh = engine.merge(second)
    for name, tensor in result.items():
        assert tensor.data_ptr() == pointers[name], name
        assert torch.equal(buffers[name], fresh[name]), name


def test_streaming_merge_yields_every_tensor_once(engine):
    recipe_ = parse_recipe(
        {
            "merge_method": "task_arithmetic",
            "base_model": "base",
            "models": [{"model": "medical", "parameters": {"weight": 0.5}}],
        }
    )
    stream = engine.iter_merge(recipe_)
    first_name, first_tensor = next(stream)
    rest = dict(stream)
    assert first_name not in rest
    assert sorted([first_name, *rest]) == sorted(engine.tensor_names)
    torch.testing.assert_close(
        first_tensor,
        engine.base_tensor(first_name) + 0.5 * engine.task_vector("medical", first_name),
        rtol=1e-6,
        atol=1e-7,
    )


def test_saved_folder_is_sharded_and_loads_in_transformers(engine, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ties = parse_recipe(
        {
            "merge_method": "ties",
            "base_model": "base",
            "models": [{"model": model, "parameters": {"weight": 0.6, "density": 0.5}} for model in EXPERTS],
        }
    )
    out = engine.save(ties, tmp_path / "merged", shard_size=1_000_000)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(engine.tensor_names)
    assert all(shard.stat().st_size <= 1_000_000 + 600_000 for shard in shards)  # a tensor is never split
    model = AutoModelForCausalLM.from_pretrained(out)
    expected = engine.merge(ties)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "merge_method: ties" in (out / "mergekit_config.yml").read_text()
    assert [path.name for path in tmp_path.iterdir()] == ["merged"]  # no staging folder left behind


def test_out_dtype_casts_tensors_and_config(engine, tmp_path):
    half = parse_recipe(
        {
            "merge_method": "linear",
            "base_model": "base",
            "models": [
                {"model": "base", "parameters": {"weight": 1.0}},
                {"model": "aligned", "parameters": {"weight": 1.0}},
            ],
            "out_dtype": "bfloat16",
        }
    )
    out = engine.save(half, tmp_path / "half")
    tensors = load_file(out / "model.safetensors")
    assert {tensor.dtype for tensor in tensors.values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    name = "model.layers.0.mlp.up_proj.weight"
    expected = (engine.base_tensor(name) + 0.5 * engine.task_vector("aligned", name)).to(torch.bfloat16)
    torch.testing.assert_close(tensors[name], expected, rtol=1e-2, atol=1e-3)


def test_pickle_checkpoints_load_with_weights_only(zoo_dir, engine, tmp_path):
    folder = tmp_path / "medical-bin"
    folder.mkdir()
    shutil.copy(zoo_dir / "medical" / "config.json", folder / "config.json")
    torch.save(load_file(zoo_dir / "medical" / "model.safetensors"), folder / "pytorch_model.bin")
    from_pickle = MergeEngine(zoo_dir / "base", {"medical": folder}, device="cpu")
    for name in STAT_TENSORS:
        assert torch.equal(from_pickle.task_vector("medical", name), engine.task_vector("medical", name))


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(_Payload.marker),))


def test_pickle_that_would_run_code_is_refused(zoo_dir, tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()
    shutil.copy(zoo_dir / "medical" / "config.json", folder / "config.json")
    _Payload.marker = str(tmp_path / "payload-ran")
    torch.save({"model.norm.weight": _Payload()}, folder / "pytorch_model.bin")
    with pytest.raises(UserError, match="weights_only"):
        MergeEngine(zoo_dir / "base", {"evil": folder}, device="cpu")
    assert not (tmp_path / "payload-ran").exists()
