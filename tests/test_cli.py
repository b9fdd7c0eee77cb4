"""The `safemerge` console script as a user runs it: --help everywhere, one-line errors on bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SAFEMERGE = str(Path(sys.executable).parent / "safemerge")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([SAFEMERGE, *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["zoo"],
        ["zoo", "build"],
        ["data"],
        ["data", "generate"],
        ["cluster", "up"],
        ["cluster", "down"],
        ["nightly"],
    ],
)
def test_every_command_has_help(command):
    result = run(*command, "--help")
    assert result.returncode == 0
    assert "usage: safemerge" in result.stdout


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize("command", [["zoo", "build"], ["data", "generate"]])
def test_seed_that_is_not_a_number_is_a_one_line_error(command, tmp_path):
    result = run(*command, "--out", str(tmp_path / "out"), "--seed", "abc")
    assert_one_line_error(result, "--seed", "whole number", "'abc'")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", [["zoo", "build"], ["data", "generate"]])
def test_existing_output_without_force_is_a_one_line_error(command, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    result = run(*command, "--out", str(tmp_path / "out"))
    assert_one_line_error(result, "not empty", "--force")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("command", [["zoo", "build"], ["data", "generate"]])
@pytest.mark.parametrize("where", ["under_a_file", "proc"])
def test_unwritable_output_is_a_one_line_error(command, where, tmp_path):
    # Tests run as root in CI, so permission bits do not stop writes; a file in the way and /proc do.
    if where == "under_a_file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "out"
    else:
        out = Path("/proc/safemerge-test-out")
    result = run(*command, "--out", str(out))
    assert_one_line_error(result, str(out))
    assert "pick" in result.stderr


def test_data_generate_writes_then_reuses(tmp_path):
    out = tmp_path / "data"
    first = run("data", "generate", "--out", str(out), "--seed", "3")
    assert first.returncode == 0, first.stderr
    assert (out / "manifest.json").is_file() and (out / "harmful" / "dataset_dict.json").is_file()
    again = run("data", "generate", "--out", str(out), "--seed", "3", "--reuse")
    assert again.returncode == 0 and "up to date" in again.stdout and "data written" not in again.stdout
    other = run("data", "generate", "--out", str(out), "--seed", "4", "--reuse")
    assert other.returncode == 0 and "data written" in other.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # no staging folders left over


@pytest.mark.parametrize(
    "method, models, parameters, fragments",
    [
        ("nearswap", ["aligned", "medical"], {"t": 0.001}, ["nearswap merges exactly 1 model(s)", "list exactly 1"]),
        ("arcee_fusion", ["aligned", "medical"], {}, ["arcee_fusion merges exactly 1 model(s)", "under models"]),
        ("ramplus_tl", ["aligned", "medical"], {"alhpa": 0.1}, ["unknown parameter 'alhpa'", "alpha, epsilon, r"]),
        ("sce", ["aligned", "medical"], {"select_topk": "half"}, ["select_topk"]),
        ("karcher", ["aligned"], {"max_iter": 2.5}, ["max_iter"]),
    ],
)
def test_bad_input_to_a_new_method_is_a_one_line_error(tmp_path, zoo_dir, method, models, parameters, fragments):
    import yaml

    recipe = {
        "merge_method": method,
        "base_model": str(zoo_dir / "base"),
        "models": [{"model": str(zoo_dir / model)} for model in models],
        "parameters": parameters,
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = run("merge", str(tmp_path / "recipe.yaml"), str(tmp_path / "out"))
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "slices, fragments",
    [
        ([[("base", [0, 2]), ("medical", [0, 2])]], ["slices[0] has 2 sources", "one per slice"]),
        ([[("base", [0, 2])], [("medical", [2, 9])]], ["slices[1]", "reaches past", "end it at 4"]),
        ([[("base", [3, 1])]], ["slices[0]", "layer_range [3, 1]"]),
    ],
)
def test_bad_passthrough_slices_are_a_one_line_error(tmp_path, zoo_dir, slices, fragments):
    import yaml

    config = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(zoo_dir / model), "layer_range": span} for model, span in item]}
            for item in slices
        ],
    }
    (tmp_path / "stack.yaml").write_text(yaml.safe_dump(config))
    result = run("merge", str(tmp_path / "stack.yaml"), str(tmp_path / "out"))
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "out").exists()
