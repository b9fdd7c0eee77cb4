"""The merge engine on a GPU, the device a search worker merges on wherever it has one: every deterministic method
gives the CPU's merge, and the random ones (drawn from the GPU's own generator) keep their density and repeat by seed.

Skipped where no CUDA GPU is present, as in CI; on a GPU machine: `pytest tests/test_merges_cuda.py`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from safemerge.merges.engine import MergeEngine
from safemerge.merges.recipe import parse_recipe
from safemerge.zoo.random_family import LlamaShape, write_random_family

DEVICE = "cuda"
pytestmark = pytest.mark.skipif(
    DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU (the CPU path has its own tests)"
)

SHAPE = LlamaShape(hidden=256, intermediate=704, layers=2, heads=4, vocab=1024)
EXPERTS = ("aligned", "medical")
DETERMINISTIC = {
    "task_arithmetic": {"weight": [1.0, 0.7]},
    "ties": {"weight": [1.0, 0.7], "density": [0.3, 0.6]},
    "breadcrumbs": {"weight": [1.0, 0.7], "density": [0.8, 0.8], "gamma": 0.05},
    "breadcrumbs_ties": {"weight": [1.0, 0.7], "density": [0.8, 0.8], "gamma": 0.05},
    "linear": {"weight": [0.6, 0.4]},
    "nuslerp": {"weight": [0.6, 0.4]},
    "model_stock": {},
}


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    """A base and two fine-tunes of it, Llama-shaped, random."""
    return write_random_family(tmp_path_factory.mktemp("family"), SHAPE, EXPERTS)


def engine_on(family: dict[str, Path], device: str) -> MergeEngine:
    return MergeEngine(family["base"], {name: family[name] for name in EXPERTS}, device=device)


@pytest.fixture(scope="module")
def engines(family) -> tuple[MergeEngine, MergeEngine]:
    return engine_on(family, "cpu"), engine_on(family, DEVICE)


def recipe(method: str, parameters: dict, seed: int = 0):
    per_model = {key: value for key, value in parameters.items() if isinstance(value, list)}
    shared = {key: value for key, value in parameters.items() if not isinstance(value, list)}
    models = [
        {"model": name, "parameters": {key: values[i] for key, values in per_model.items()}}
        for i, name in enumerate(EXPERTS)
    ]
    raw = {"merge_method": method, "models": models, "parameters": shared, "seed": seed}
    if method != "linear":
        raw["base_model"] = "base"
    return parse_recipe(raw)


def magnitude_is_tied(engine: MergeEngine, name: str, index: tuple[int, ...]) -> bool:
    """Whether the element's magnitude occurs more than once in some model's task vector."""
    magnitudes = (engine.task_vector(model, name).abs() for model in EXPERTS)
    return any(int((tensor == tensor[index]).sum()) > 1 for tensor in magnitudes)


@pytest.mark.parametrize("method", sorted(DETERMINISTIC))
def test_a_gpu_merge_is_the_cpu_merge(engines, method):
    cpu, gpu = engines
    wanted = cpu.merge(recipe(method, DETERMINISTIC[method]))
    got = gpu.merge(recipe(method, DETERMINISTIC[method]))
    for name, tensor in wanted.items():
        assert got[name].device.type == DEVICE
        # Sums run in another order on the GPU: equal to float32 rounding, elementwise. Where a magnitude tie
        # straddles breadcrumbs' cut, which tied element stays follows the device's sort, as in mergekit (on
        # this family: 2 elements of 180224 in one tensor): only such elements may differ.
        close = torch.isclose(got[name].cpu(), tensor, rtol=1e-5, atol=1e-7)
        differing = [tuple(index.tolist()) for index in (~close).nonzero()]
        assert len(differing) <= 4, (method, name, len(differing))
        assert all(magnitude_is_tied(cpu, name, index) for index in differing), (method, name, differing)


@pytest.mark.parametrize("method", ["slerp", "mergealign"])
def test_two_model_methods_on_the_gpu_are_the_cpu_merge(engines, method):
    cpu, gpu = engines
    if method == "slerp":
        raw = {"merge_method": "slerp", "base_model": "aligned", "parameters": {"t": 0.4}}
        raw["models"] = [{"model": "aligned"}, {"model": "medical"}]
    else:
        raw = {
            "merge_method": "mergealign",
            "base_model": "base",
            "alignment_model": "aligned",
            "models": [
                {"model": "aligned", "parameters": {"lambda_align": 1.1}},
                {"model": "medical", "parameters": {"lambda_domain": 0.9}},
            ],
        }
    wanted, got = cpu.merge(parse_recipe(raw)), gpu.merge(parse_recipe(raw))
    for name, tensor in wanted.items():
        torch.testing.assert_close(got[name].cpu(), tensor, rtol=1e-5, atol=1e-7, msg=f"{method} {name}")


@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
def test_random_methods_on_the_gpu_keep_the_density_and_repeat_by_seed(engines, method):
    _, gpu = engines
    parameters = {"weight": [1.0, 0.0], "density": [0.3, 0.3], "rescale": False}
    first = gpu.merge(recipe(method, parameters, seed=7))
    again = gpu.merge(recipe(method, parameters, seed=7))
    other = gpu.merge(recipe(method, parameters, seed=8))
    for name in ("model.embed_tokens.weight", "model.layers.1.mlp.up_proj.weight"):
        assert torch.equal(first[name], again[name]) and not torch.equal(first[name], other[name]), name
        base, task_vector = gpu.base_tensor(name), gpu.task_vector("aligned", name)
        visible = (base + task_vector) != base  # changes that survive float32 rounding at all
        share = float(((first[name] != base) & visible).sum() / visible.sum())
        tolerance = 5 * (0.3 * 0.7 / base.numel()) ** 0.5  # five standard deviations of a binomial share
        assert abs(share - 0.3) < tolerance, (name, share)
