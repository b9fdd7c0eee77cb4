"""The search config: loading with dotted overrides, errors that name the field, model roles, anchoring to a
project folder, and where model references resolve."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from safemerge.errors import UserError
from safemerge.search.anchoring import anchored_model, anchored_path, anchored_url
from safemerge.search.config import ObjectivesConfig, SearchConfig, load_config, parse_config

from .support import config_data, make_config


def write_config(folder: Path, data: dict) -> Path:
    path = folder / "search.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_load_config_applies_dotted_overrides_on_top_of_the_file(tmp_path):
    data = config_data()
    data["evaluation"] = {"max_tokens": 32, "judge": "refusal"}
    path = write_config(tmp_path, data)
    config = load_config(path, {"trials": 8, "evaluation.limit": 20, "workers.count": 2, "mlflow.experiment": "x"})
    assert config.trials == 8
    assert config.evaluation.limit == 20
    assert config.evaluation.max_tokens == 32  # a dotted override changes one field, not the whole section
    assert config.workers.count == 2
    assert config.mlflow.experiment == "x"
    assert config.mlflow.tracking_uri == "sqlite:///artifacts/mlflow.db"  # the rest of the section: defaults
    assert load_config(path).trials == 24  # the file itself is unchanged


def test_load_config_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match=r"nope\.yaml does not exist; start from configs/zoo\.yaml"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(UserError, match=r"broken\.yaml is not valid YAML"):
        load_config(broken)
    listed = tmp_path / "list.yaml"
    listed.write_text("- name\n- models\n")
    with pytest.raises(UserError, match=r"list\.yaml must be a mapping of fields"):
        load_config(listed)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"objectives.maximize": ["kindness"]}, "objectives: unknown objective 'kindness'"),
        ({"objectives.constraints": {"helpfulness": "<= 0.1"}}, "objectives: unknown objective 'helpfulness'"),
        ({"objectives.minimize": ["safety"]}, "objectives: an objective is listed twice"),
        ({"methods": ["ties", "frobnicate"]}, "methods: unknown or unsearchable method 'frobnicate'"),
        ({"methods": ["nuslerp"]}, "methods: unknown or unsearchable method 'nuslerp'"),
        ({"methods": ["ties", "passthrough"]}, "methods: passthrough changes the layer count, so it cannot be swapped"),
        ({"methods": []}, "methods: list at least one merge method"),
        (
            {"methods": ["slerp"], "models.experts": {"medical": "zoo:medical", "finance": "zoo:finance"}},
            "(top level): slerp: merges the aligned model with one expert; with several experts, drop slerp from",
        ),
        (
            {
                "methods": ["ties", "nearswap", "arcee_fusion"],
                "models.experts": {"medical": "zoo:m", "finance": "zoo:f"},
            },
            "(top level): nearswap, arcee_fusion: merges the aligned model with one expert; with several experts, drop "
            "nearswap, arcee_fusion from methods",
        ),
        ({"sampler": "cmaes"}, "(top level): sampler cmaes optimizes one scalar: set objectives to minimize"),
        (
            {"objectives.maximize": ["safety"], "objectives.minimize": ["combined"]},
            "(top level): combined is already a scalar",
        ),
        ({"models.experts": {"base": "zoo:medical"}}, "models.experts: domain 'base' is the name of a model role"),
        ({"models.experts": {"aligned": "zoo:medical"}}, "models.experts: domain 'aligned' is the name of a model"),
        ({"models.experts": {"Medical": "zoo:medical"}}, "models.experts: domain 'Medical' must be a lower-case name"),
        ({"objectives.constraints": {"over_refusal": "< 0.1"}}, "'< 0.1' must look like '<= 0.1' or '>= 0.5'"),
        ({"objectives.constraints": {"over_refusal": "<= low"}}, "'<= low' must look like '<= 0.1'"),
        ({"evaluation.judge": "guard"}, "(top level): evaluation.judge 'guard' needs models.guard"),
        ({"evaluation.judge": "vibes"}, "(top level): evaluation.judge must be 'refusal' or 'guard'"),
        ({"workers.count": 0}, "workers.count: count must be at least 1, or 'auto'"),
        ({"trials": 0}, "trials: Input should be greater than or equal to 1"),
        ({"evaluaton.limit": 5}, "evaluaton: Extra inputs are not permitted"),
        ({"sampler": "annealing"}, "sampler: Input should be 'tpe'"),
        ({"evaluation.alpha": float("nan")}, "evaluation.alpha: Input should be a finite number"),
        ({"workers.gpu_memory_gib": float("inf")}, "workers.gpu_memory_gib: Input should be a finite number"),
    ],
)
def test_a_bad_config_is_one_error_naming_the_field(overrides, message):
    with pytest.raises(UserError) as error:
        parse_config(config_data(), "my-search.yaml", overrides)
    text = str(error.value)
    assert text.startswith("config my-search.yaml: ")
    assert message in text
    assert "\n" not in text


@pytest.mark.parametrize(
    "overrides",
    [
        {"sampler": "cmaes", "objectives.maximize": [], "objectives.minimize": ["combined"]},
        {"methods": ["slerp", "ties"]},  # one expert: slerp is fine
        {"evaluation.judge": "guard", "models.guard": "zoo:guard"},
        {"workers.count": "auto"},
        {"objectives.constraints": {"over_refusal": ">= 0.5"}},
    ],
)
def test_the_fixes_the_errors_name_are_accepted(overrides):
    parse_config(config_data(), "my-search.yaml", overrides)


def test_constraints_follow_optunas_convention_satisfied_at_or_below_zero():
    objectives = ObjectivesConfig(constraints={"over_refusal": "<= 0.1", "safety": ">= 0.5"})
    assert objectives.violations({"over_refusal": 0.3, "safety": 0.7}) == [pytest.approx(0.2), pytest.approx(-0.2)]
    assert objectives.violations({"over_refusal": 0.1, "safety": 0.5}) == [pytest.approx(0.0), pytest.approx(0.0)]
    assert ObjectivesConfig(maximize=["safety"], minimize=["over_refusal"]).directions() == ["maximize", "minimize"]


def test_roles_name_each_expert_after_its_domain():
    config = make_config(**{"models.experts": {"medical": "zoo:medical", "finance": "/models/finance"}})
    assert config.models.roles() == {
        "base": "zoo:base",
        "aligned": "zoo:aligned",
        "medical": "zoo:medical",
        "finance": "/models/finance",
    }
    assert config.models.merged_roles() == ["aligned", "medical", "finance"]


def test_anchored_makes_every_relative_path_absolute_against_home(tmp_path):
    home = tmp_path / "project"
    (home / "models" / "medical").mkdir(parents=True)
    config = make_config(
        **{
            "models.aligned": "meta-llama/Llama-3-8B-Instruct",  # a hub id: no such folder under home
            "models.experts": {"medical": "models/medical"},  # a folder under home
            "storage": "sqlite:///artifacts/optuna.db",
            "mlflow.tracking_uri": "mlruns",
        }
    )
    anchored = config.anchored(home)
    assert isinstance(anchored, SearchConfig)
    assert anchored.zoo_dir == home / "artifacts" / "zoo"
    assert anchored.data == home / "artifacts" / "data"
    assert anchored.results_dir == home / "artifacts" / "searches"
    assert anchored.storage == f"sqlite:///{home}/artifacts/optuna.db"
    assert anchored.storage.startswith("sqlite:////")  # SQLAlchemy's spelling of an absolute path
    assert anchored.mlflow.tracking_uri == str(home / "mlruns")
    assert anchored.models.base == "zoo:base"
    assert anchored.models.aligned == "meta-llama/Llama-3-8B-Instruct"
    assert anchored.models.experts == {"medical": str(home / "models" / "medical")}
    assert anchored.models.guard is None
    assert config.storage == "sqlite:///artifacts/optuna.db"  # the original is left as it was
    assert anchored.anchored(tmp_path / "elsewhere") == anchored  # anchoring twice changes nothing


def test_anchoring_leaves_absolute_paths_and_servers_alone(tmp_path):
    home = tmp_path / "project"
    assert anchored_url("sqlite:////var/lib/optuna.db", home) == "sqlite:////var/lib/optuna.db"
    assert anchored_url("sqlite:///data/optuna.db", home) == f"sqlite:///{home}/data/optuna.db"
    assert anchored_url("postgresql://user@db:5432/optuna", home) == "postgresql://user@db:5432/optuna"
    assert anchored_url("http://127.0.0.1:5000", home) == "http://127.0.0.1:5000"
    assert anchored_url("runs.db", home) == str(home / "runs.db")
    assert anchored_url("/abs/runs.db", home) == "/abs/runs.db"
    assert anchored_path(Path("/abs/zoo"), home) == Path("/abs/zoo")
    assert anchored_path(Path("zoo"), home) == home / "zoo"
    assert anchored_model("zoo:medical", home) == "zoo:medical"
    assert anchored_model("/models/medical", home) == "/models/medical"
    assert anchored_model(None, home) is None
    assert anchored_model("org/model", home) == "org/model"  # no such folder under home: a hub id
    (home / "org" / "model").mkdir(parents=True)
    assert anchored_model("org/model", home) == str(home / "org" / "model")


def test_a_zoo_model_that_is_not_built_names_the_build_command(tmp_path):
    config = make_config(zoo_dir=str(tmp_path / "zoo"))
    with pytest.raises(UserError) as error:
        config.resolve_model("zoo:base")
    assert f"safemerge zoo build --out {tmp_path / 'zoo'}" in str(error.value)
    assert "'zoo:base'" in str(error.value)


def test_model_references_resolve_to_zoo_and_local_folders(tmp_path):
    zoo = tmp_path / "zoo"
    (zoo / "base").mkdir(parents=True)
    (zoo / "base" / "config.json").write_text("{}")
    local = tmp_path / "my-expert"
    local.mkdir()
    config = make_config(zoo_dir=str(zoo))
    assert config.resolve_model("zoo:base") == zoo / "base"
    assert config.resolve_model(str(local)) == local
    (zoo / "medical").mkdir()  # a folder without config.json is not a built model
    with pytest.raises(UserError, match="zoo model 'zoo:medical' is not at"):
        config.resolve_model("zoo:medical")


def test_a_storage_password_is_taken_out_of_the_config_and_kept_for_the_driver_only(monkeypatch):
    import pickle

    from safemerge.search.secrets import STORAGE_PASSWORD_ENV, ConnectArgs, secret_environment, storage_password

    monkeypatch.delenv(STORAGE_PASSWORD_ENV, raising=False)
    config = make_config(storage="postgresql+psycopg://optuna:s3cr%40t-pw@db.internal:5432/optuna")
    assert config.storage == "postgresql+psycopg://optuna@db.internal:5432/optuna"
    assert "s3cr" not in config.model_dump_json() and "s3cr" not in repr(config)
    assert storage_password(config.storage) == "s3cr@t-pw"  # percent-decoded, as the driver sends it
    connect_args = ConnectArgs(config.storage)
    assert connect_args == {"password": "s3cr@t-pw"}
    assert b"s3cr" not in pickle.dumps(connect_args) and b"s3cr" not in pickle.dumps(config)
    assert secret_environment(config.storage) == {STORAGE_PASSWORD_ENV: "s3cr@t-pw"}


def test_a_storage_password_from_the_environment_for_a_process_that_never_saw_it(monkeypatch):
    from safemerge.search.secrets import STORAGE_PASSWORD_ENV, ConnectArgs

    monkeypatch.setenv(STORAGE_PASSWORD_ENV, "from-env")
    assert ConnectArgs("postgresql+psycopg://optuna@elsewhere:5432/optuna") == {"password": "from-env"}


def test_mlflow_server_credentials_move_to_mlflows_environment(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    config = make_config(**{"mlflow.tracking_uri": "https://ci:tok3n@mlflow.internal:5000/base"})
    assert config.mlflow.tracking_uri == "https://mlflow.internal:5000/base"
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "ci" and os.environ["MLFLOW_TRACKING_PASSWORD"] == "tok3n"


def test_an_mlflow_database_url_with_a_password_is_refused():
    with pytest.raises(UserError, match="mlflow.tracking_uri: a database URL with a password"):
        make_config(**{"mlflow.tracking_uri": "postgresql://mlflow:pw@db/mlflow"})
