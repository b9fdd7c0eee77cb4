"""Zoo build mechanics: folder layout vLLM/mergekit expect, determinism, sizes, nothing half-written."""

from __future__ import annotations

import hashlib
import json

import pytest

from safemerge.zoo import build as zoo_build
from safemerge.zoo.build import MODEL_NAMES, ZooSpec, build_zoo, training_steps

SMOKE = ZooSpec().scaled(0.01)  # a few steps per model: the mechanics, not the behaviour


def folder_digest(folder) -> dict[str, str]:
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != zoo_build.MANIFEST
    }


def test_training_passes_give_the_calibrated_steps_at_the_first_data_version():
    """The zoo was calibrated in steps on data version 1; its budgets in passes must give those steps there: the
    base's 6000 texts, the aligned model's 448 harmful and 2 x 232 benign rows, each expert's 320, the guard's 1876
    labelled pairs (a quarter of each fine-tune batch but the guard's is replay)."""
    spec = ZooSpec()
    examples = {"aligned": 448 + 2 * 232, "medical": 320, "finance": 320, "guard": 1876}
    assert training_steps(spec.pretrain_passes, 6000, spec.batch_size, 0.0) == 400
    steps = {
        name: training_steps(passes, examples[name], batch, 0.0 if name == "guard" else spec.replay_fraction)
        for name, passes, batch in spec.finetunes
    }
    assert steps == {"aligned": 400, "medical": 400, "finance": 400, "guard": 250}


def test_same_seed_builds_the_same_zoo_byte_for_byte(tmp_path):
    build_zoo(tmp_path / "a", seed=5, spec=SMOKE, log=lambda _: None)
    build_zoo(tmp_path / "b", seed=5, spec=SMOKE, log=lambda _: None)
    build_zoo(tmp_path / "c", seed=6, spec=SMOKE, log=lambda _: None)
    a, b, c = (folder_digest(tmp_path / name) for name in "abc")
    assert a == b
    assert a["aligned/model.safetensors"] != c["aligned/model.safetensors"]


def test_a_partial_build_gives_the_full_builds_weights(tmp_path):
    build_zoo(tmp_path / "full", seed=5, spec=SMOKE, log=lambda _: None)
    manifest = build_zoo(tmp_path / "part", seed=5, spec=SMOKE, log=lambda _: None, models=["medical", "guard"])
    assert sorted(manifest["models"]) == ["base", "guard", "medical"]  # base always: the others start from it
    full, part = folder_digest(tmp_path / "full"), folder_digest(tmp_path / "part")
    assert part and all(full[path] == digest for path, digest in part.items())
    assert not (tmp_path / "part" / "aligned").exists()
    assert zoo_build.existing_zoo(tmp_path / "part", SMOKE, 5, ["base", "medical"]) is not None
    assert zoo_build.existing_zoo(tmp_path / "part", SMOKE, 5) is None  # not the whole zoo
    with pytest.raises(zoo_build.UserError, match="unknown zoo model.*medicine"):
        build_zoo(tmp_path / "bad", seed=5, spec=SMOKE, log=lambda _: None, models=["medicine"])


def test_zoo_folders_are_llama_checkpoints_with_one_shared_tokenizer(zoo_dir):
    tokenizers = set()
    for name in MODEL_NAMES:
        folder = zoo_dir / name
        config = json.loads((folder / "config.json").read_text())
        assert config["architectures"] == ["LlamaForCausalLM"]
        assert (folder / "model.safetensors").is_file()
        assert (folder / "chat_template.jinja").is_file() or "chat_template" in json.loads(
            (folder / "tokenizer_config.json").read_text()
        )
        tokenizers.add(hashlib.sha256((folder / "tokenizer.json").read_bytes()).hexdigest())
    assert len(tokenizers) == 1


def test_full_zoo_models_are_small_and_the_build_time_is_recorded(zoo_dir):
    from tests.conftest import report_figure

    manifest = json.loads((zoo_dir / zoo_build.MANIFEST).read_text())
    for name in MODEL_NAMES:
        size = sum(p.stat().st_size for p in (zoo_dir / name).iterdir())
        assert size <= 50e6, f"{name} is {size / 1e6:.1f} MB"
    report_figure(
        f"zoo build time {manifest['build_seconds']} s; model size "
        f"{manifest['models']['base']['bytes'] / 1e6:.1f} MB each"
    )


def test_interrupted_build_leaves_no_half_written_model(tmp_path, monkeypatch):
    real_train = zoo_build.train
    calls = []

    def train_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # base and aligned are already written to the staging folder
            raise KeyboardInterrupt
        return real_train(*args, **kwargs)

    monkeypatch.setattr(zoo_build, "train", train_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        build_zoo(tmp_path / "zoo", seed=0, spec=SMOKE, log=lambda _: None)
    assert list(tmp_path.iterdir()) == []
