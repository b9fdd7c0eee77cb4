"""A whole search on a random family in the formats real checkpoints come in, all at once: Qwen2-shaped (q/k/v
biases), grouped-query attention, tied embeddings, bf16 weights, sharded safetensors with an index, and a vocabulary
padded beyond its tokenizer (the zoo's). `safemerge search run` drives it end to end on the CPU (real Ray, the vLLM
CPU engine, Optuna, MLflow); the merged folder it registers loads in transformers and holds exactly the tensors of
the in-memory merge of its trial's recipe."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from safemerge.merges.engine import MergeEngine
from safemerge.merges.recipe import parse_recipe
from safemerge.weights import SAFETENSORS_INDEX
from safemerge.zoo.random_family import LlamaShape, write_random_family

SAFEMERGE = str(Path(sys.executable).parent / "safemerge")
# head_dim 32, vLLM CPU attention's smallest; 4 query heads share 2 key-value heads; vocab above the zoo's 800.
SHAPE = LlamaShape(
    hidden=128,
    intermediate=256,
    layers=2,
    heads=4,
    vocab=832,
    kv_heads=2,
    tie_embeddings=True,
    attention_bias=True,
    dtype="bfloat16",
)
SHARD = 300_000  # bytes: about 3 shards a model


@pytest.fixture(scope="module")
def family(zoo_dir: Path, tmp_path_factory) -> dict[str, Path]:
    return write_random_family(
        tmp_path_factory.mktemp("random-family"),
        SHAPE,
        ("aligned", "medical"),
        shard_size=SHARD,
        tokenizer_from=zoo_dir / "base",
    )


def search_config(tmp_path: Path, family: dict[str, Path], data_dir: Path) -> Path:
    """A two-trial search over the family: each method's warm-start recipe, a few prompts a set, short answers."""
    config = {
        "name": "random-family",
        "models": {
            "base": str(family["base"]),
            "aligned": str(family["aligned"]),
            "experts": {"medical": str(family["medical"])},
        },
        "data": str(data_dir),
        "methods": ["task_arithmetic", "ties"],
        "layer_groups": 2,
        "module_filters": True,
        "trials": 2,
        "workers": {"count": 1, "cpus": 1, "gpus": 0},
        "storage": f"sqlite:///{tmp_path}/optuna.db",
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"},
        "evaluation": {"judge": "refusal", "limit": 3, "max_tokens": 8},
        "results_dir": str(tmp_path / "searches"),
    }
    path = tmp_path / "random-family.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.vllm
def test_search_on_a_random_family_of_every_format_registers_the_in_memory_merge(family, data_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    assert len(list(family["base"].glob("model-*.safetensors"))) > 1 and (family["base"] / SAFETENSORS_INDEX).is_file()
    result = subprocess.run(
        [SAFEMERGE, "search", "run", str(search_config(tmp_path, family, data_dir))],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[2/2]" in result.stdout, result.stdout[-2000:]
    summary = json.loads((tmp_path / "searches" / "random-family" / "pareto.json").read_text())
    assert summary["completed"] == 2 and summary["failed"] == 0 and summary["front"]
    entry = next(entry for entry in summary["front"] if "balanced" in entry["aliases"])  # registered with weights

    # The folder the registry holds (a copy of the one the worker saved), as a user downloads it. Both URIs set
    # for the call: a models:/ address resolves through the registry, and a search an earlier test ran in this
    # process pinned both process-wide, which an environment variable does not override.
    store = f"sqlite:///{tmp_path}/mlflow.db"
    pinned = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(store)
    mlflow.set_registry_uri(store)
    try:
        registered = mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{entry['registered_model']}/{entry['version']}", dst_path=str(tmp_path / "download")
        )
    finally:
        mlflow.set_tracking_uri(pinned[0])
        mlflow.set_registry_uri(pinned[1])
    # MLflow's transformers flavour over the merged folder: nothing is cloudpickled.
    assert "transformers:" in (Path(registered) / "MLmodel").read_text() and not list(Path(registered).rglob("*.pkl"))
    folders = [path.parent for path in Path(registered).rglob("config.json") if path.parent.name != "download"]
    assert len(folders) == 1, folders
    merged_dir = folders[0]
    for file_name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (merged_dir / file_name).is_file(), file_name

    model = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.dtype == torch.bfloat16
    assert model.config.tie_word_embeddings and model.config.num_key_value_heads == 2
    loaded = model.state_dict()

    engine = MergeEngine(
        family["base"], {"aligned": family["aligned"], "medical": family["medical"]}, base_name="base", device="cpu"
    )
    expected = engine.merge(parse_recipe(entry["recipe"]))
    assert "lm_head.weight" not in expected and "model.layers.0.self_attn.q_proj.bias" in expected
    assert sorted(loaded) == sorted([*expected, "lm_head.weight"])
    for name, tensor in expected.items():
        assert loaded[name].dtype == tensor.dtype == torch.bfloat16, name
        assert torch.equal(loaded[name], tensor), name
    assert torch.equal(loaded["lm_head.weight"], expected["model.embed_tokens.weight"])  # still tied
