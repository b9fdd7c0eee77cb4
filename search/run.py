"""A whole search as a user runs it: tune on the dev split, then evaluate the Pareto front on the test split,
materialize each Pareto merge, export it as mergekit YAML, register it in MLflow, and write `pareto.json`."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import ray
from mlflow.entities import Metric

from safemerge.errors import UserError
from safemerge.merges.recipe import parse_recipe, to_mergekit_yaml
from safemerge.search.config import SearchConfig
from safemerge.search.driver import front_of, open_storage, run_search, search_folder, study_points, worker_pool
from safemerge.search.lease import DriverLease
from safemerge.search.pareto import hypervolume_history
from safemerge.search.tracking import Tracker, choose_aliases, pareto_plots, scratch_folder

SUMMARY = "pareto.json"


def execute(config: SearchConfig, log: Callable[[str], None] = print, finalize: bool = True) -> dict:
    """Run (or resume) the search to its budget, then finalize it; returns the summary written to pareto.json."""
    started = time.perf_counter()
    # One driver per search: refused here, before MLflow, Ray or any file, while another driver's lease is fresh.
    storage, _ = open_storage(config)
    with DriverLease(config.name, storage, config.lease_timeout_s) as lease:
        if lease.took_stale:
            log(f"{config.name}: the driver that held this search (pid {lease.took_stale.get('pid')}) is gone")
        tracker = Tracker(config)
        log(f"MLflow parent run: {tracker.run_url}")
        try:
            with worker_pool(config) as workers:
                study = run_search(config, workers, on_trial_finished=tracker.sync_trials_soon, log=log)
                if finalize:
                    summary = finalize_search(config, study, workers, tracker, log)
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
    tracker.sync_trials(study)
    points = study_points(study)
    front = front_of(study, config)
    tracker.mark_pareto(front)
    failed = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)))
    log(f"{config.name}: {len(points)} trials completed, {failed} failed, {len(front)} on the feasible Pareto front")
    folder = search_folder(config)
    artifacts = scratch_folder()
    try:
        history = hypervolume_history(points, config.objectives)
        (artifacts / "hypervolume.json").write_text(
            json.dumps(
                [
                    {"trial": p.number, "hypervolume": h}
                    for p, h in zip(sorted(points, key=lambda p: p.number), history, strict=True)
                ],
                indent=2,
            )
        )
        recipes = {p.number: study.trials[p.number].user_attrs["recipe"] for p in front}
        pareto_plots(
            points,
            front,
            config.objectives,
            artifacts,
            {p.number: study.trials[p.number].user_attrs["recipe"]["merge_method"] for p in points},
        )
        table, similarity_metrics = ray.get(workers[0].similarity.remote(config.layer_groups))
        (artifacts / "similarity.txt").write_text(table + "\n")
        now = int(time.time() * 1000)
        tracker.client.log_batch(
            tracker.parent_id, metrics=[Metric(k, v, now, 0) for k, v in similarity_metrics.items()]
        )
        model_paths = ray.get(workers[0].model_paths.remote())
        (artifacts / "recipes").mkdir()
        for number, recipe in recipes.items():
            (artifacts / "recipes" / f"trial-{number}.yaml").write_text(
                to_mergekit_yaml(parse_recipe(recipe), model_paths)
            )
        if history:
            tracker.client.log_metric(tracker.parent_id, "hypervolume", history[-1])

        # Test split, in parallel over the workers: the search never saw it.
        test_metrics = ray.get(
            [workers[i % len(workers)].evaluate.remote(recipes[p.number], "test") for i, p in enumerate(front)]
        )
        aliases = choose_aliases(front, config.objectives)
        models_dir = folder / "models"
        entries = []
        for point, metrics in zip(front, test_metrics, strict=True):
            tracker.log_test_metrics(point.number, metrics)
            model_dir = Path(
                ray.get(workers[0].save.remote(recipes[point.number], str(models_dir / f"trial-{point.number}")))
            )
            name, version = tracker.register(point.number, model_dir, aliases.get(point.number, []))
            entries.append(
                {
                    "trial": point.number,
                    "method": recipes[point.number]["merge_method"],
                    "dev": point.metrics,
                    "test": metrics,
                    "model_dir": str(model_dir),
                    "registered_model": name,
                    "version": version,
                    "aliases": aliases.get(point.number, []),
                    "recipe": recipes[point.number],
                }
            )
        tracker.log_artifacts(artifacts)
    finally:
        shutil.rmtree(artifacts, ignore_errors=True)
    summary = {
        "search": config.name,
        "sampler": config.sampler,
        "trials": config.trials,
        "completed": len(points),
        "failed": failed,
        "hypervolume": history[-1] if history else 0.0,
        "front": entries,
        "mlflow_run": tracker.run_url,
    }
    (folder / SUMMARY).write_text(json.dumps(summary, indent=2, default=float))
    return summary


def load_summary(name: str, results_dir: Path = Path("artifacts/searches")) -> dict:
    path = Path(results_dir) / name / SUMMARY
    if not path.is_file():
        raise UserError(
            f"search {name!r} has no Pareto summary under {results_dir}; run or resume it first "
            f"(`safemerge search resume {name}`)"
        )
    return json.loads(path.read_text())


def format_front(summary: dict) -> str:
    header = (
        f"{'trial':>5}  {'method':16} {'dev safety':>10} {'dev domain':>10} {'test safety':>11} "
        f"{'test domain':>11} {'test over-ref':>13}  registered"
    )
    lines = [
        f"search {summary['search']} ({summary['sampler']}, {summary['completed']} trials, "
        f"{summary['failed']} failed, hypervolume {summary['hypervolume']:.4f})",
        header,
    ]
    for entry in summary["front"]:
        dev, test = entry["dev"], entry["test"]
        aliases = f" [{', '.join(entry['aliases'])}]" if entry["aliases"] else ""
        lines.append(
            f"{entry['trial']:>5}  {entry['method']:16} {dev.get('safety', float('nan')):10.3f} "
            f"{dev.get('domain', float('nan')):10.3f} {test['safety']:11.3f} {test['domain']:11.3f} "
            f"{test['over_refusal']:13.3f}  {entry['registered_model']} v{entry['version']}{aliases}"
        )
    return "\n".join(lines)
