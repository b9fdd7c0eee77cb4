"""`safemerge merge / export / similarity` as a user runs them: --help, bad input refused before any work with one line
naming the model, tensor or parameter at fault, exports that mergekit reads, similarity figures that mean something."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from safemerge.cli import main as safemerge
from safemerge.merges.engine import MergeEngine
from safemerge.merges.recipe import parse_recipe, to_mergekit_yaml
from safemerge.merges.similarity import similarity_metrics

SAFEMERGE = str(Path(sys.executable).parent / "safemerge")
NAME = "model.layers.2.mlp.up_proj.weight"


@pytest.mark.parametrize("command", ["merge", "export", "similarity"])
def test_every_merge_command_has_help(command):
    result = subprocess.run([SAFEMERGE, command, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert f"usage: safemerge {command}" in result.stdout


def write_config(tmp_path: Path, zoo: Path, method: str = "ties", **overrides) -> Path:
    config = {
        "merge_method": method,
        "base_model": str(zoo / "base"),
        "models": [
            {"model": str(zoo / "aligned"), "parameters": {"weight": 0.5, "density": 0.5}},
            {"model": str(zoo / "medical"), "parameters": {"weight": 0.5, "density": 0.5}},
        ],
        "dtype": "float32",
    }
    config.update(overrides)
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_merge(config: Path, out: Path, capsys) -> tuple[int, str]:
    code = safemerge(["merge", str(config), str(out), "--device", "cpu"])
    error = capsys.readouterr().err.strip()
    if code != 0:
        assert len(error.splitlines()) == 1, error
        assert not out.exists()  # refused before any output was written
    return code, error


def broken_copy(zoo: Path, tmp_path: Path, change) -> Path:
    """A copy of the medical expert with `change(tensors, config)` applied."""
    folder = tmp_path / "broken"
    shutil.copytree(zoo / "medical", folder)
    tensors = load_file(folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    change(tensors, config)
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _nan(tensors, config):
    tensors[NAME][3, 5] = float("nan")


def _shape(tensors, config):
    tensors[NAME] = tensors[NAME][:256]


def _rename(tensors, config):
    tensors["model.layers.2.mlp.up.weight"] = tensors.pop(NAME)


def _architecture(tensors, config):
    config["num_hidden_layers"] = 6


@pytest.mark.parametrize(
    "change, fragments",
    [
        (_nan, ["NaN", NAME]),
        (_shape, ["shape", NAME, "(256, 128)", "(512, 128)"]),
        (_rename, ["tensor", "model.layers.2.mlp.up"]),
        (_architecture, ["num_hidden_layers", "6"]),
    ],
    ids=["nan", "shape", "tensor-names", "architecture"],
)
def test_broken_checkpoint_is_named_before_any_work(zoo_dir, tmp_path, capsys, change, fragments):
    broken = broken_copy(zoo_dir, tmp_path, change)
    config = write_config(
        tmp_path,
        zoo_dir,
        models=[
            {"model": str(zoo_dir / "aligned"), "parameters": {"weight": 0.5, "density": 0.5}},
            {"model": str(broken), "parameters": {"weight": 0.5, "density": 0.5}},
        ],
    )
    code, error = run_merge(config, tmp_path / "out", capsys)
    assert code == 2
    assert str(broken) in error
    for fragment in fragments:
        assert fragment in error


def test_missing_weights_and_missing_folders_are_named(zoo_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(zoo_dir / "medical" / "config.json", empty / "config.json")
    for model, fragment in ((empty, "no weights"), (tmp_path / "nowhere", "not a local model folder")):
        config = write_config(
            tmp_path, zoo_dir, models=[{"model": str(model), "parameters": {"weight": 1.0, "density": 0.5}}]
        )
        code, error = run_merge(config, tmp_path / "out", capsys)
        assert code == 2 and fragment in error and str(model) in error


@pytest.mark.parametrize(
    "overrides, fragments",
    [
        ({"merge_method": "tie"}, ["unknown merge_method 'tie'", "ties"]),
        ({"parameters": {"densty": 0.5}}, ["unknown parameter 'densty'", "density"]),
        ({"parameters": {"density": 1.5}}, ["density 1.5", "(0, 1]"]),
        ({"parameters": {"density": [0.5, 0.0]}}, ["density 0", "model.layers.3"]),
        ({"parameters": {"weight": "heavy"}}, ["'weight' must be a number", "'heavy'"]),
        ({"slices": []}, ["'slices' is not supported"]),
    ],
    ids=["method", "parameter", "density-high", "density-zero-at-last-layer", "not-a-number", "slices"],
)
def test_bad_recipe_is_refused_before_any_work(zoo_dir, tmp_path, capsys, overrides, fragments):
    config = write_config(tmp_path, zoo_dir)
    data = yaml.safe_load(config.read_text())
    data.update(overrides)
    if "parameters" in overrides:
        for model in data["models"]:
            model["parameters"].pop("density")
    config.write_text(yaml.safe_dump(data))
    code, error = run_merge(config, tmp_path / "out", capsys)
    assert code == 2
    for fragment in fragments:
        assert fragment in error, error


def test_shared_parameter_on_a_model_says_where_it_belongs():
    with pytest.raises(Exception, match="shared by all models; move it"):
        parse_recipe(
            {
                "merge_method": "ties",
                "base_model": "base",
                "models": [{"model": "aligned", "parameters": {"weight": 1.0, "normalize": False}}],
            }
        )


def test_existing_output_is_kept_without_force(zoo_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code = safemerge(["merge", str(write_config(tmp_path, zoo_dir)), str(out)])
    assert code == 2 and "--force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_export_cli_writes_what_mergekit_reads(zoo_dir, tmp_path, capsys):
    recipe = {
        "merge_method": "mergealign",
        "base_model": "base",
        "alignment_model": "aligned",
        "models": [{"model": "aligned", "parameters": {"lambda_align": [1.0, 0.5]}}, {"model": "medical"}],
        "parameters": {"lambda_domain": 0.7},
        "seed": 3,
    }
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    paths = [f"--path={name}={zoo_dir / name}" for name in ("base", "aligned", "medical")]
    assert safemerge(["export", str(tmp_path / "recipe.json"), *paths, "--out", str(tmp_path / "out.yaml")]) == 0
    exported = yaml.safe_load((tmp_path / "out.yaml").read_text())
    assert exported == {
        "merge_method": "task_arithmetic",
        "base_model": str(zoo_dir / "base"),
        "models": [
            {"model": str(zoo_dir / "aligned"), "parameters": {"weight": [1.0, 0.5]}},
            {"model": str(zoo_dir / "medical"), "parameters": {"weight": 0.7}},
        ],
    }
    assert (tmp_path / "out.yaml").read_text() == to_mergekit_yaml(
        parse_recipe(recipe), {name: str(zoo_dir / name) for name in ("base", "aligned", "medical")}
    )
    assert safemerge(["export", str(tmp_path / "recipe.json"), "--path", "medical"]) == 2
    assert "NAME=FOLDER" in capsys.readouterr().err


def test_similarity_of_a_model_with_its_copy(zoo_dir, tmp_path, capsys):
    shutil.copytree(zoo_dir / "medical", tmp_path / "medical-copy")
    args = [str(zoo_dir / "base"), str(zoo_dir / "medical"), str(tmp_path / "medical-copy"), str(zoo_dir / "finance")]
    assert safemerge(["similarity", *args, "--groups", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [row["group"] for row in report["groups"]] == ["layers 0-1", "layers 2-3", "other", "all"]
    for row in report["groups"]:
        assert row["cosine"]["medical vs medical-copy"] == pytest.approx(1.0)
        assert row["sign_conflict"]["medical vs medical-copy"] == 0.0
        assert row["cosine"]["medical vs finance"] < 0.9
        assert 0 < row["sign_conflict"]["medical vs finance"] < 1
    # The figures are the plain definitions: check one group by hand.
    base, medical, finance = (
        load_file(zoo_dir / name / "model.safetensors") for name in ("base", "medical", "finance")
    )
    names = [name for name in base if name.startswith(("model.layers.2.", "model.layers.3."))]
    tau_medical = torch.cat([(medical[name] - base[name]).reshape(-1) for name in names]).double()
    tau_finance = torch.cat([(finance[name] - base[name]).reshape(-1) for name in names]).double()
    row = report["groups"][1]
    assert row["cosine"]["medical vs finance"] == pytest.approx(
        float(tau_medical @ tau_finance / (tau_medical.norm() * tau_finance.norm())), rel=1e-6
    )
    base_norm = torch.cat([base[name].reshape(-1) for name in names]).double().norm()
    assert row["norm_ratio"]["finance"] == pytest.approx(float(tau_finance.norm() / base_norm), rel=1e-6)
    assert safemerge(["similarity", *args[:3]]) == 0
    table = capsys.readouterr().out
    assert "cos medical vs medical-copy" in table and "layers 3" in table


def test_similarity_metrics_have_mlflow_names(zoo_dir):
    engine = MergeEngine(
        zoo_dir / "base", {"aligned": zoo_dir / "aligned", "medical": zoo_dir / "medical"}, device="cpu"
    )
    metrics = similarity_metrics(engine, groups=2)
    assert "similarity/cosine/aligned_vs_medical/layers_0-1" in metrics
    assert all(set(key) <= set("abcdefghijklmnopqrstuvwxyz0123456789_-./") for key in metrics)
    assert all(isinstance(value, float) for value in metrics.values())
