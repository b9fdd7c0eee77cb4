"""A whole search as a user runs it: tune on the dev split, then evaluate the Pareto front on the test split,
export each Pareto merge as mergekit YAML, materialize the ones registered with weights (`register:` in the
config), register them all in MLflow, and write `pareto.json`."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import optuna

from safemerge.errors import UserError
from safemerge.files import atomic_output_dir, write_json_atomic
from safemerge.search.budget import recorded_seconds, spend_of
from safemerge.search.config import SearchConfig
from safemerge.search.driver import (
    front_of,
    open_storage,
    run_search,
    search_folder,
    study_points,
    worker_pool,
)
from safemerge.search.lease import DriverLease
from safemerge.search.pareto import hypervolume_history
from safemerge.search.progress import mlflow_location
from safemerge.search.tracking import Tracker, choose_aliases, pareto_plots
from safemerge.search.trainable import ask_workers, restart_limit_s

SUMMARY = "pareto.json"
ARTIFACTS = "mlflow-artifacts"  # the parent run's artifacts, kept until MLflow has them
SIMILARITY = "similarity.json"  # the similarity metrics and the layer groups they were computed for


def execute(config: SearchConfig, log: Callable[[str], None] = print, finalize: bool = True) -> dict:
    """Run (or resume) the search to its budget, then finalize it; returns the summary written to pareto.json."""
    started = time.perf_counter()
    # One driver per search: refused here, before MLflow, Ray or any file, while another driver's lease is fresh.
    storage, _ = open_storage(config)
    with DriverLease(config.name, storage, config.lease_timeout_s) as lease:
        if lease.took_stale:
            log(f"{config.name}: the driver that held this search (pid {lease.took_stale.get('pid')}) is gone")
        tracker = Tracker(config, log)
        log(f"MLflow parent run: {mlflow_location(config, tracker.run_url)}")
        try:
            with worker_pool(config) as workers:
                study = run_search(config, workers, on_trial_finished=tracker.sync_trials_soon, log=log)
                if finalize:
                    summary = finalize_search(config, study, workers, tracker, log)
                    if not workers.started:
                        log(f"{config.name}: an earlier finalize had tested and recorded this front; no worker started")
                else:
                    tracker.sync_trials(study)
                    summary = {}
        except BaseException:
            tracker.finish("KILLED")
            raise
        tracker.finish()
    summary["seconds"] = round(time.perf_counter() - started, 1)
    log(f"{config.name}: done in {summary['seconds']} s")
    return summary


def finalize_search(
    config: SearchConfig, study: optuna.Study, workers: list, tracker: Tracker, log: Callable[[str], None] = print
) -> dict:
    """Test the feasible Pareto front, save its merges, write pareto.json and the MLflow artifacts folder, then
    mirror it all to MLflow. Idempotent: a front entry already tested and saved by an earlier finalize (same
    recipe, folder still there) is reused, and the mirror adds nothing MLflow already has."""
    points = study_points(study)
    front = front_of(study, config)
    failed = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)))
    pruned = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.PRUNED,)))
    log(
        f"{config.name}: {len(points)} trials completed, {f'{pruned} pruned, ' if pruned else ''}{failed} failed, "
        f"{len(front)} on the feasible Pareto front"
    )
    folder = search_folder(config)

    # A call to a worker a fault hit in the last trial waits for its restart; a hung one is ended as trials do.
    def ask(calls: list[tuple[str, tuple]]) -> list:
        timeout_s = config.evaluation.trial_timeout_s
        return ask_workers(workers, calls, timeout_s, restart_limit_s(timeout_s))

    history = hypervolume_history(points, config.objectives)
    recipes = {p.number: study.trials[p.number].user_attrs["recipe"] for p in front}
    earlier = {
        entry["trial"]: entry
        for entry in (read_summary(folder) or {}).get("front", [])
        if entry["recipe"] == recipes.get(entry["trial"])
    }
    with atomic_output_dir(folder / ARTIFACTS, force=True) as artifacts:
        (artifacts / "hypervolume.json").write_text(
            json.dumps(
                [
                    {"trial": p.number, "hypervolume": h}
                    for p, h in zip(sorted(points, key=lambda p: p.number), history, strict=True)
                ],
                indent=2,
            )
        )
        pareto_plots(
            points,
            front,
            config.objectives,
            artifacts,
            {p.number: study.trials[p.number].user_attrs["recipe"]["merge_method"] for p in points},
        )
        # What an earlier finalize wrote and still holds for this front is kept: a finished search's resume asks
        # the workers nothing, so they never start (search/driver.py WorkerPool).
        similarity = read_similarity(folder / ARTIFACTS, config.layer_groups)
        if similarity is None:
            [similarity] = ask([("similarity", (config.layer_groups,))])
        table, similarity_metrics = similarity
        (artifacts / "similarity.txt").write_text(table + "\n")
        (artifacts / SIMILARITY).write_text(
            json.dumps({"layer_groups": config.layer_groups, "metrics": similarity_metrics}, indent=2)
        )
        (artifacts / "recipes").mkdir()
        texts = {number: earlier_yaml(folder / ARTIFACTS, number) if number in earlier else None for number in recipes}
        missing = [number for number, text in texts.items() if text is None]
        texts.update(zip(missing, ask([("mergekit_yaml", (recipes[n],)) for n in missing]), strict=True))
        for number in recipes:
            (artifacts / "recipes" / f"trial-{number}.yaml").write_text(texts[number])
    # Test split, in parallel over the workers: the search never saw it.
    untested = [p for p in front if p.number not in earlier]
    tested = ask([("evaluate", (recipes[p.number], "test")) for p in untested])
    test_metrics = {number: entry["test"] for number, entry in earlier.items()}
    test_metrics.update({p.number: metrics for p, metrics in zip(untested, tested, strict=True)})
    aliases = choose_aliases(front, config.objectives)
    entries = []
    for point in front:
        previous = earlier.get(point.number, {})
        picked = previous.get("picked", [])
        # Weights only where registered with them: a recipe-only entry writes no model folder (kilobytes, not GBs).
        weights = with_weights(config, aliases.get(point.number, []) or picked) or bool(previous.get("weights"))
        model_dir = previous.get("model_dir")
        if weights and not (model_dir and Path(model_dir).is_dir()):
            out_dir = str(folder / "models" / f"trial-{point.number}")
            [model_dir] = ask([("save", (recipes[point.number], out_dir))])
        entries.append(
            {
                "trial": point.number,
                "method": recipes[point.number]["merge_method"],
                "dev": point.metrics,
                "test": test_metrics[point.number],
                "model_dir": str(model_dir) if weights else None,
                "weights": weights,
                "registered_model": previous.get("registered_model"),
                "version": previous.get("version"),
                "aliases": aliases.get(point.number, []),
                "picked": picked,
                "recipe": recipes[point.number],
            }
        )
    spend = spend_of(study, recorded_seconds(study))
    summary = {
        "search": config.name,
        "sampler": config.sampler,
        "trials": config.trials,
        "completed": len(points),
        "failed": failed,
        "hypervolume": history[-1] if history else 0.0,
        "spend": spend.metrics(),
        "parent_metrics": {
            **({"hypervolume": history[-1]} if history else {}),
            **similarity_metrics,
            **spend.metrics(),
        },
        "front": entries,
        "inputs": input_models(config),
        "mlflow_run": tracker.run_url,
    }
    write_json_atomic(folder / SUMMARY, summary)  # the record first: MLflow may not answer
    mirror(tracker, study, summary, folder, log)
    return summary


def read_similarity(artifacts: Path, layer_groups: int | None) -> tuple[str, dict[str, float]] | None:
    """The similarity table and metrics an earlier finalize wrote under `artifacts` for the same layer groups."""
    table, record = artifacts / "similarity.txt", artifacts / SIMILARITY
    if not (table.is_file() and record.is_file()):
        return None
    recorded = json.loads(record.read_text())
    if recorded.get("layer_groups") != layer_groups:
        return None
    return table.read_text().rstrip("\n"), recorded["metrics"]


def earlier_yaml(artifacts: Path, number: int) -> str | None:
    """Trial `number`'s mergekit YAML as an earlier finalize wrote it under `artifacts`, if still there."""
    path = artifacts / "recipes" / f"trial-{number}.yaml"
    return path.read_text() if path.is_file() else None


def with_weights(config: SearchConfig, aliases: list[str]) -> bool:
    """Whether finalize registers a front entry with its weights: every entry (`register: all`), the aliased
    ones (`picks`), none (`recipes`)."""
    return config.registration == "all" or (config.registration == "picks" and bool(aliases))


def input_models(config: SearchConfig) -> dict[str, dict[str, str]]:
    """Each input model's reference and what identifies its weights: a hub reference's revision (the cluster
    pins it to a commit), a local folder's safetensors content hash."""
    from safemerge.search.model_sources import is_hub_reference, split_revision
    from safemerge.weights import content_hash

    inputs = {}
    for role, reference in config.models.roles().items():
        if is_hub_reference(reference):
            inputs[role] = {"reference": reference, "revision": split_revision(reference)[1] or "main"}
        else:
            folder = config.resolve_model(reference)
            inputs[role] = {"reference": reference, "folder": str(folder)}
            try:
                inputs[role]["sha256"] = content_hash(folder, {})  # over its safetensors files
            except UserError:  # weights in another format (pytorch_model.bin): the folder names them
                pass
    return inputs


def mirror(tracker: Tracker, study: optuna.Study, summary: dict, folder: Path, log: Callable[[str], None]) -> bool:
    """Mirror a finalized search to MLflow and record the registry versions in pareto.json; True when all of it
    reached MLflow."""
    done = tracker.mirror_summary(study, summary, folder / ARTIFACTS)
    write_json_atomic(folder / SUMMARY, summary)
    if not done:
        log(
            f"{summary['search']}: pareto.json is written; registering its front waits for MLflow "
            f"(`safemerge search sync {summary['search']}`)"
        )
    return done


def sync(config: SearchConfig, log: Callable[[str], None] = print) -> dict | None:
    """Mirror a search's study (and its finalized front, if any) to MLflow, under the search's lease; returns the
    summary, or None when the search is not finalized yet."""
    storage, study = open_storage(config)
    with DriverLease(config.name, storage, config.lease_timeout_s):
        tracker = Tracker(config, log)
        summary = read_summary(search_folder(config))
        if summary is None:
            created = tracker.sync_trials(study)
            done = created is not None
            if done:
                log(f"{config.name}: {created} trial runs logged; the search is not finalized yet")
        else:
            done = mirror(tracker, study, summary, search_folder(config), log)
        tracker.finish()
    if not done:
        raise UserError(
            f"MLflow at {config.mlflow.tracking_uri} does not answer; start it (or fix mlflow.tracking_uri) and run "
            f"`safemerge search sync {config.name}` again"
        )
    log(f"{config.name}: MLflow is up to date ({tracker.run_url})")
    return summary


def read_summary(folder: Path) -> dict | None:
    path = Path(folder) / SUMMARY
    return json.loads(path.read_text()) if path.is_file() else None


def load_summary(name: str, results_dir: Path = Path("artifacts/searches")) -> dict:
    summary = read_summary(Path(results_dir) / name)
    if summary is None:
        raise UserError(
            f"search {name!r} has no Pareto summary under {results_dir}; run or resume it first "
            f"(`safemerge search resume {name}`)"
        )
    return summary


def format_front(summary: dict) -> str:
    header = (
        f"{'trial':>5}  {'method':16} {'dev safety':>10} {'dev domain':>10} {'test safety':>11} "
        f"{'test domain':>11} {'test over-ref':>13}  registered"
    )
    spend = summary.get("spend")  # (pareto.json files written before budgets have none)
    spent = f", {spend['spent_generated_tokens']:,.0f} tokens in {spend['spent_minutes']:.1f} min" if spend else ""
    lines = [
        f"search {summary['search']} ({summary['sampler']}, {summary['completed']} trials, "
        f"{summary['failed']} failed, hypervolume {summary['hypervolume']:.4f}{spent})",
        header,
    ]
    for entry in summary["front"]:
        dev, test = entry["dev"], entry["test"]
        aliases = f" [{', '.join(entry['aliases'])}]" if entry["aliases"] else ""
        registered = (
            f"{entry['registered_model']} v{entry['version']}"
            if entry.get("version") is not None
            else "pending (MLflow did not answer)"
        )
        lines.append(
            f"{entry['trial']:>5}  {entry['method']:16} {dev.get('safety', float('nan')):10.3f} "
            f"{dev.get('domain', float('nan')):10.3f} {test['safety']:11.3f} {test['domain']:11.3f} "
            f"{test['over_refusal']:13.3f}  {registered}{aliases}"
        )
    return "\n".join(lines)
