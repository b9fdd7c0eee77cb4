"""Atomic outputs (a result appears complete or not at all) and the command line: every command is listed,
usage errors are one line with exit code 2, and --set overrides any config field."""

from __future__ import annotations

import json

import pytest

from safemerge.cli import build_parser, main
from safemerge.errors import UserError
from safemerge.files import atomic_output_dir, check_output_dir, write_json_atomic
from safemerge.search.cli import config_overrides
from safemerge.search.config import load_config
from safemerge.search.samplers import SAMPLER_NAMES

from .support import config_data

COMMANDS = ("zoo", "data", "eval", "search", "pareto", "pick", "merge", "export", "similarity", "cluster", "nightly")


# Atomic outputs.


def test_a_finished_output_folder_appears_whole_and_replaces_the_old_one(tmp_path):
    out = tmp_path / "merged"
    with atomic_output_dir(out) as staging:
        assert staging.parent == tmp_path and staging != out
        (staging / "model.safetensors").write_text("new")
        assert not out.exists()  # nothing under the final name until the block succeeds
    assert (out / "model.safetensors").read_text() == "new"
    with atomic_output_dir(out, force=True) as staging:
        (staging / "config.json").write_text("{}")
    assert sorted(path.name for path in out.iterdir()) == ["config.json"]  # replaced, not mixed
    assert [path.name for path in tmp_path.iterdir()] == ["merged"]  # no staging or trash folder left


def test_a_failed_output_leaves_nothing_behind_and_the_old_result_intact(tmp_path):
    out = tmp_path / "merged"
    with pytest.raises(RuntimeError), atomic_output_dir(out) as staging:
        (staging / "half.safetensors").write_text("part")
        raise RuntimeError("merge failed")
    assert list(tmp_path.iterdir()) == []
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(RuntimeError), atomic_output_dir(out, force=True) as staging:
        (staging / "half.safetensors").write_text("part")
        raise RuntimeError("merge failed")
    assert [path.name for path in out.iterdir()] == ["keep.txt"]
    assert [path.name for path in tmp_path.iterdir()] == ["merged"]


def test_output_folder_checks_fail_before_any_work(tmp_path):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(UserError, match="--out .*a-file is a file, not a folder"):
        check_output_dir(tmp_path / "a-file", force=True)
    with pytest.raises(UserError, match="--model .*a-file/sub cannot be created: .*a-file is not a folder"):
        check_output_dir(tmp_path / "a-file" / "sub", force=False, option="--model")
    full = tmp_path / "full"
    full.mkdir()
    (full / "old.txt").write_text("x")
    with pytest.raises(UserError, match="is not empty; pass --force to replace it"):
        check_output_dir(full, force=False)
    with pytest.raises(UserError, match="is not empty"), atomic_output_dir(full):
        pass
    assert (full / "old.txt").read_text() == "x"
    check_output_dir(full, force=True)
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty", force=False)
    check_output_dir(tmp_path / "new" / "deeper", force=False)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a-file", "empty", "full"]  # checks write nothing


def test_write_json_atomic_writes_the_content_and_keeps_a_backup_on_request(tmp_path):
    path = tmp_path / "state" / "nightly.json"
    write_json_atomic(path, {"b": 1, "a": [1, 2]})
    assert json.loads(path.read_text()) == {"b": 1, "a": [1, 2]}
    assert not path.with_name("nightly.json.bak").exists()
    write_json_atomic(path, {"b": 2}, keep_backup=True, sort_keys=True)
    assert json.loads(path.read_text()) == {"b": 2}
    assert json.loads(path.with_name("nightly.json.bak").read_text()) == {"b": 1, "a": [1, 2]}
    write_json_atomic(path, {"b": 3, "a": 0}, sort_keys=True)
    assert path.read_text() == '{\n  "a": 0,\n  "b": 3\n}\n'
    assert json.loads(path.with_name("nightly.json.bak").read_text()) == {"b": 1, "a": [1, 2]}  # untouched
    assert sorted(p.name for p in path.parent.iterdir()) == ["nightly.json", "nightly.json.bak"]  # no temp file


def test_a_value_json_cannot_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    path = tmp_path / "state.json"
    write_json_atomic(path, {"ok": True})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"ok": True}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


# The command line.


def test_the_root_parser_lists_every_command(capsys):
    parser = build_parser()
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["frobnicate"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    listed = error.split("choose from ", 1)[1].split(")", 1)[0]
    assert sorted(name.strip(" '") for name in listed.split(",")) == sorted(COMMANDS)
    for command in COMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([command, "--help"])
        assert exit_info.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: safemerge {command}")


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["frobnicate"], ["invalid choice: 'frobnicate'", "(see `safemerge --help`)"]),
        (["search", "run"], ["safemerge search run: error:", "config", "(see `safemerge search run --help`)"]),
        (["search", "run", "c.yaml", "--trials", "many"], ["--trials", "whole number", "'many'"]),
        (["search", "run", "c.yaml", "--sampler", "annealing"], ["--sampler", "invalid choice: 'annealing'"]),
        ([], ["required: COMMAND"]),
    ],
)
def test_a_usage_error_is_one_line_and_exit_code_2(argv, fragments, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    for fragment in fragments:
        assert fragment in lines[0]
    assert captured.out == ""


def test_the_cli_accepts_every_sampler_the_config_accepts():
    parser = build_parser()
    for name in SAMPLER_NAMES:
        assert parser.parse_args(["search", "run", "c.yaml", "--sampler", name]).sampler == name


def test_a_user_error_from_a_command_is_one_line_and_exit_code_2(tmp_path, capsys):
    assert main(["pareto", "nope", "--results-dir", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("safemerge: error: search 'nope' has no Pareto summary")
    assert len(captured.err.strip().splitlines()) == 1


def test_set_overrides_any_field_with_yaml_values(tmp_path):
    import yaml

    args = build_parser().parse_args(
        [
            "search",
            "run",
            "c.yaml",
            "--trials",
            "8",
            "--workers",
            "2",
            "--set",
            "evaluation.limit=20",
            "--set",
            "methods=[ties, slerp]",
            "--set",
            "mlflow.tracking_uri=http://127.0.0.1:5000",
            "--set",
            "module_filters=false",
            "--set",
            "objectives.constraints={over_refusal: '<= 0.2'}",
        ]
    )
    overrides = config_overrides(args)
    assert overrides == {
        "trials": 8,
        "workers.count": 2,
        "evaluation.limit": 20,
        "methods": ["ties", "slerp"],
        "mlflow.tracking_uri": "http://127.0.0.1:5000",
        "module_filters": False,
        "objectives.constraints": {"over_refusal": "<= 0.2"},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config_data()))
    config = load_config(path, overrides)
    assert (config.trials, config.workers.count, config.evaluation.limit) == (8, 2, 20)
    assert config.methods == ["ties", "slerp"] and config.module_filters is False
    assert config.objectives.constraints == {"over_refusal": "<= 0.2"}


@pytest.mark.parametrize("item", ["evaluation.limit", "=20", ""])
def test_a_set_without_key_and_value_is_a_user_error_naming_it(item):
    args = build_parser().parse_args(["search", "run", "c.yaml", "--set", item])
    with pytest.raises(UserError) as error:
        config_overrides(args)
    assert f"--set {item!r} must look like KEY=VALUE" in str(error.value)


def test_a_set_value_that_is_not_yaml_is_a_user_error_saying_to_quote_it():
    # `>` opens a YAML block scalar: a constraint written as on the config's line must be quoted on the command line.
    args = build_parser().parse_args(["search", "run", "c.yaml", "--set", "objectives.constraints.domain=>= 0.5"])
    with pytest.raises(UserError, match="the value is not YAML") as error:
        config_overrides(args)
    assert "quote it, for example objectives.constraints.domain='>= 0.5'" in str(error.value)
    quoted = build_parser().parse_args(["search", "run", "c.yaml", "--set", "objectives.constraints.domain='>= 0.5'"])
    assert config_overrides(quoted) == {"objectives.constraints.domain": ">= 0.5"}


def test_a_bad_set_through_the_cli_is_one_line_and_exit_code_2(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(config_data()))
    assert main(["search", "run", str(path), "--set", "trials"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("safemerge: error: --set 'trials' must look like KEY=VALUE")
    assert len(err.strip().splitlines()) == 1
    assert main(["search", "run", str(path), "--set", "trials=0"]) == 2
    assert "trials: Input should be greater than or equal to 1" in capsys.readouterr().err


def test_a_release_folder_linking_outside_the_releases_folder_is_skipped(tmp_path):
    from safemerge.cluster.nightly import scan_releases

    releases, elsewhere = tmp_path / "releases", tmp_path / "elsewhere"
    for folder in (releases / "medical-1", elsewhere / "secret-model"):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(b"weights of " + folder.name.encode())
    (releases / "medical-2").symlink_to(elsewhere / "secret-model")
    (releases / "medical-3").symlink_to(releases / "medical-1")  # a link inside the folder is a release
    lines = []
    found = scan_releases(str(releases), {}, log=lines.append, settle_s=0)
    assert sorted(release.name for release in found) == ["medical-1", "medical-3"]
    assert len(lines) == 1 and "medical-2 links to" in lines[0] and "skipped" in lines[0]


def test_a_release_still_being_copied_is_skipped_until_it_is_stable(tmp_path):
    import os
    import time

    from safemerge.cluster.nightly import scan_releases

    releases = tmp_path / "releases"
    for name in ("landed", "copying"):
        (releases / name).mkdir(parents=True)
        (releases / name / "config.json").write_text("{}")
        (releases / name / "model.safetensors").write_bytes(b"weights of " + name.encode())
    an_hour_ago = time.time() - 3600
    for path in [releases / "landed", *(releases / "landed").iterdir()]:
        os.utime(path, (an_hour_ago, an_hour_ago))
    lines = []
    assert [r.name for r in scan_releases(str(releases), {}, log=lines.append, settle_s=60)] == ["landed"]
    assert len(lines) == 1 and lines[0].startswith("nightly: copying changed") and "skipped" in lines[0]
    assert sorted(r.name for r in scan_releases(str(releases), {}, log=lines.append, settle_s=0)) == [
        "copying",
        "landed",
    ]


def test_a_scheduled_search_is_named_by_its_models_releases_and_pins_hub_revisions(tmp_path, monkeypatch):
    import huggingface_hub

    from safemerge.cluster.job import named_by_release
    from tests.unit.support import make_config

    folders = {}
    for name in ("base", "aligned", "medical-1", "medical-2"):
        folders[name] = tmp_path / name
        folders[name].mkdir()
        (folders[name] / "config.json").write_text("{}")
        (folders[name] / "model.safetensors").write_bytes(b"weights of " + name.encode())
    commits = {"org/expert": "a" * 40}

    class Hub:  # the hub cannot be reached here: its answer for model_info, as the real client returns it
        def model_info(self, repo, revision=None):
            return type("ModelInfo", (), {"sha": commits[repo] if revision in (None, "main") else revision})()

    monkeypatch.setattr(huggingface_hub, "HfApi", Hub)

    def config_with(expert: str):
        models = {"base": str(folders["base"]), "aligned": str(folders["aligned"]), "experts": {"medical": expert}}
        return make_config(name="nightly", models=models)

    first = named_by_release(config_with(str(folders["medical-1"])))
    again = named_by_release(config_with(str(folders["medical-1"])))
    second = named_by_release(config_with(str(folders["medical-2"])))
    assert first.name == again.name != second.name and first.name.startswith("nightly-")
    assert first.models.experts["medical"] == str(folders["medical-1"])  # a folder stays as it is
    hub = named_by_release(config_with("org/expert"))
    assert hub.models.experts["medical"] == "org/expert@" + "a" * 40  # every worker downloads this commit
    commits["org/expert"] = "b" * 40  # a new release on the hub: a search of its own
    assert named_by_release(config_with("org/expert")).name != hub.name
