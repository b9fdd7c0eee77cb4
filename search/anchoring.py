"""Anchoring a search config to a project folder: a Ray job runs in an uploaded copy of the code, not in the
project folder, so every relative path of the config (folders, sqlite URLs, local model folders) is made
absolute against the folder the paths were written for."""

from __future__ import annotations

from pathlib import Path

from safemerge.search.config import SearchConfig


def anchored_path(value: Path, home: Path) -> Path:
    return value if Path(value).is_absolute() else home / value


def anchored_url(value: str, home: Path) -> str:
    """A sqlite URL (or a bare .db / mlruns path) with a relative path, made absolute; others as given.

    sqlite:///NAME is relative and sqlite:////NAME absolute (SQLAlchemy); file:///NAME is already absolute."""
    scheme, separator, rest = value.partition(":///")
    if separator and scheme == "sqlite" and not rest.startswith("/") and rest != ":memory:":
        return f"{scheme}:///{home / rest}"
    if "://" not in value and not Path(value).is_absolute() and value.endswith((".db", "mlruns")):
        return str(home / value)
    return value


def anchored_model(reference: str | None, home: Path) -> str | None:
    """A relative model folder that exists under `home`, made absolute; zoo names and hub ids as given."""
    if reference is None or reference.startswith("zoo:") or Path(reference).is_absolute():
        return reference
    return str(home / reference) if (home / reference).is_dir() else reference


def anchored(config: SearchConfig, home: Path) -> SearchConfig:
    """`config` with every relative path made absolute against `home`."""
    home = Path(home).absolute()
    data = config.model_dump(mode="json")
    data.update(
        zoo_dir=str(anchored_path(config.zoo_dir, home)),
        data=str(anchored_path(config.data, home)),
        results_dir=str(anchored_path(config.results_dir, home)),
        storage=anchored_url(config.storage, home),
    )
    if config.evaluation.lm_eval_include_path is not None:
        data["evaluation"]["lm_eval_include_path"] = str(anchored_path(config.evaluation.lm_eval_include_path, home))
    data["mlflow"]["tracking_uri"] = anchored_url(config.mlflow.tracking_uri, home)
    models = data["models"]
    for key in ("base", "aligned", "guard"):
        models[key] = anchored_model(models[key], home)
    models["experts"] = {domain: anchored_model(ref, home) for domain, ref in models["experts"].items()}
    return SearchConfig.model_validate(data)
