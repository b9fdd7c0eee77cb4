"""`safemerge pick NAME TRIAL --alias ALIAS`: what a person runs after choosing a merge of a finalized search's
front in the MLflow UI. The trial's merge is materialized in this process (the merge engine `safemerge merge`
uses; no Ray), registered with its weights in MLflow's transformers flavour (or its version with weights reused)
and the alias set on it. Running it again adds nothing."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from safemerge.errors import UserError
from safemerge.files import write_json_atomic
from safemerge.search.config import BASE_ROLE, SearchConfig


def materialize(config: SearchConfig, recipe: dict, out_dir: Path) -> Path:
    """The recipe's merge as a Hugging Face folder at `out_dir` (atomically), merged here on the CPU or GPU."""
    from safemerge.merges.engine import MergeEngine
    from safemerge.merges.recipe import parse_recipe

    folders = {role: config.resolve_model(reference) for role, reference in config.models.roles().items()}
    others = {role: folder for role, folder in folders.items() if role != BASE_ROLE}
    engine = MergeEngine(folders[BASE_ROLE], others, base_name=BASE_ROLE)
    return Path(engine.save(parse_recipe(recipe, source="recipe"), out_dir, force=True))


def front_entry(summary: dict, trial: int) -> dict:
    for entry in summary["front"]:
        if entry["trial"] == trial:
            return entry
    on_front = ", ".join(str(entry["trial"]) for entry in summary["front"]) or "none"
    raise UserError(
        f"trial {trial} is not on the Pareto front of search {summary['search']!r} (its front: {on_front}); "
        f"pick one of those (`safemerge pareto {summary['search']}` lists them)"
    )


def pick(
    name: str, trial: int, alias: str, results_dir: Path = Path("artifacts/searches"), log: Callable = print
) -> dict:
    """Register trial `trial` of search `name` with its weights under `alias`; returns its front entry."""
    from safemerge.search.driver import load_search_config, open_storage, search_folder
    from safemerge.search.lease import DriverLease
    from safemerge.search.run import ARTIFACTS, SUMMARY, read_summary
    from safemerge.search.tracking import Tracker

    config = load_search_config(name, results_dir)
    folder = search_folder(config)
    summary = read_summary(folder)
    if summary is None:
        raise UserError(
            f"search {name!r} is not finalized (no {SUMMARY} in {folder}); let it finish, or run "
            f"`safemerge search resume {name}`"
        )
    entry = front_entry(summary, trial)
    storage, study = open_storage(config)
    with DriverLease(config.name, storage, config.lease_timeout_s):
        model_dir = entry.get("model_dir")
        if not (model_dir and Path(model_dir).is_dir()):
            log(f"{name}: merging trial {trial} ({entry['method']}) into {folder / 'models' / f'trial-{trial}'}")
            entry["model_dir"] = str(materialize(config, entry["recipe"], folder / "models" / f"trial-{trial}"))
            write_json_atomic(folder / SUMMARY, summary)
        tracker = Tracker(config, log)
        # The trial's run first, should MLflow have been down for all of the search (idempotent).
        registered = tracker.sync_trials(study) is not None and tracker.register_pick(
            summary, entry, alias, folder / ARTIFACTS
        )
        tracker.finish()
        write_json_atomic(folder / SUMMARY, summary)
    if not registered:
        raise UserError(
            f"MLflow at {config.mlflow.tracking_uri} does not answer; start it (or fix mlflow.tracking_uri) and run "
            f"`safemerge pick {name} {trial} --alias {alias}` again"
        )
    model = entry["registered_model"]
    log(f"{name}: trial {trial} ({entry['method']}) is {model} version {entry['version']}, alias {alias}")
    log(f'load it with: mlflow.transformers.load_model("models:/{model}@{alias}")')
    return entry
