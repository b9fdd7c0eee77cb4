"""The search driver: Ray Tune with OptunaSearch on a persistent Optuna storage, trials on worker actors.

The Optuna study (named after the search) is the record of truth: a trial counts once it is told to the
study. Resuming a killed search puts the trials that were running back in the queue with their own
parameters, then runs what is left of the budget, so no completed trial is lost or repeated.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import optuna
import ray
import yaml
from ray import tune
from ray.tune.search.optuna import OptunaSearch
from ray.util.queue import Queue
from safemerge.search.config import SearchConfig, load_config
from safemerge.search.pareto import Point, hypervolume, pareto_front
from safemerge.search.space import GRID_SPACE, grid_recipe, standard_points, suggest_recipe
from safemerge.search.trainable import run_trial

from safemerge.errors import UserError

METRIC_KEYS = (
    "safety",
    "over_refusal",
    "domain",
    "ce_safety",
    "ce_domain",
    "combined",
    "skipped",
    "worker",
    "duration_s",
)
CONFIG_FILE = "config.yaml"


def make_sampler(config: SearchConfig, trials_so_far: int = 0) -> optuna.samplers.BaseSampler:
    """The configured sampler; constraints reach it through each trial's `set_constraint` values.

    The seed is offset by the trials the study already holds: a resumed search must not replay the random
    proposals of its first run (a fresh search keeps the configured seed exactly)."""
    seed = config.seed + trials_so_far
    startup = max(4, config.trials // 5)
    if config.sampler == "nsga2":
        population = max(4, min(50, config.trials // 4))  # several generations even on a small budget
        return optuna.samplers.NSGAIISampler(population_size=population, seed=seed)
    if config.sampler == "tpe":
        return optuna.samplers.TPESampler(multivariate=True, group=True, seed=seed, n_startup_trials=startup)
    if config.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup)
    if config.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if config.sampler == "grid":
        return optuna.samplers.GridSampler(GRID_SPACE, seed=seed)
    return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=max(2, config.trials // 6))


class DefineByRun:
    """The search space as Ray's OptunaSearch wants it: a picklable callable of an Optuna trial that returns
    the recipe as a constant of the trial's config."""

    def __init__(self, config: SearchConfig, num_layers: int) -> None:
        self.config, self.num_layers = config, num_layers

    def __call__(self, trial: optuna.Trial) -> dict:
        recipe_for = grid_recipe if self.config.sampler == "grid" else suggest_recipe
        return {"recipe": recipe_for(trial, self.config, self.num_layers)}


class ConstrainedOptunaSearch(OptunaSearch):
    """OptunaSearch that also hands Optuna the constraint values and keeps every metric on the trial."""

    def __init__(self, *args, search_config: SearchConfig, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.search_config = search_config

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None and result and not error:
            ot_trial.set_user_attr("metrics", {key: float(result[key]) for key in METRIC_KEYS if key in result})
            ot_trial.set_user_attr("recipe", json.loads(result["recipe_json"]))
            violations = self.search_config.objectives.violations(result)
            ot_trial.set_user_attr("constraint", violations)
            for name, value in zip(self.search_config.objectives.constraints, violations, strict=True):
                ot_trial.set_constraint(name, value)
        super().on_trial_complete(trial_id, result=result, error=error)


def study_points(study: optuna.Study) -> list[Point]:
    """Every completed trial as a Pareto point."""
    points = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        metrics = trial.user_attrs.get("metrics")
        if metrics is None:
            continue
        points.append(Point(trial.number, metrics, all(v <= 0 for v in trial.user_attrs.get("constraint", [0.0]))))
    return points


class Progress(tune.Callback):
    """One line per finished trial: done/total, failures, current hypervolume; `on_finished` hooks in."""

    def __init__(
        self,
        config: SearchConfig,
        study: optuna.Study,
        already_done: int,
        on_finished: Callable[[], None] | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        self.config, self.study, self.done, self.on_finished, self.log = config, study, already_done, on_finished, log
        self.failed = 0
        self.started = time.perf_counter()

    def _line(self, what: str) -> None:
        self.done += 1
        volume = hypervolume(study_points(self.study), self.config.objectives)
        self.log(
            f"[{self.done}/{self.config.trials}] {what} | failed {self.failed} | hypervolume {volume:.4f} "
            f"| {time.perf_counter() - self.started:.0f} s"
        )
        if self.on_finished is not None:
            self.on_finished()

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        result = trial.last_result
        shown = ", ".join(f"{k} {result[k]:.2f}" for k in self.config.objectives.names() if k in result)
        self._line(f"{trial.config['recipe']['merge_method']}: {shown}")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.failed += 1
        self._line(f"{trial.config['recipe']['merge_method']}: FAILED")


def open_study(config: SearchConfig) -> optuna.Study:
    objectives = config.objectives
    directions = objectives.directions()
    return optuna.create_study(
        study_name=config.name, storage=config.storage, load_if_exists=True, directions=directions
    )


def requeue_interrupted(study: optuna.Study) -> int:
    """Trials left RUNNING by a killed driver go back to WAITING with their parameters: the next ask()
    picks them up, so they run again under their own number instead of being lost or duplicated."""
    storage = study._storage  # noqa: SLF001 - the storage API is public; the handle has no public getter
    stale = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for trial in stale:
        storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.WAITING)  # noqa: SLF001
    return len(stale)


def finished_count(study: optuna.Study) -> int:
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL, optuna.trial.TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=states))


def ensure_storage_folder(storage: str) -> None:
    if storage.startswith("sqlite:///"):
        Path(storage[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def worker_pool(config: SearchConfig) -> Iterator[list]:
    """Ray (local unless RAY_ADDRESS names a cluster) and the config's worker actors, killed on exit."""
    from safemerge.search.trial import start_workers

    if not ray.is_initialized():
        # "local" unless RAY_ADDRESS is set (as inside a Ray job): never a cluster that a stale
        # /tmp/ray/ray_current_cluster file names.
        address = os.environ.get("RAY_ADDRESS") or "local"
        # A local Ray offers one more logical CPU than the workers take: Tune's trial coordinators (0.01 CPU
        # each) must fit beside them, or a search with one worker per core never schedules a trial.
        needed = math.ceil(config.workers.count * config.workers.cpus) + 1 if config.workers.count != "auto" else 0
        ray.init(
            address=address,
            num_cpus=max(os.cpu_count() or 1, needed) if address == "local" else None,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    workers = start_workers(config)
    try:
        yield workers
    finally:
        for worker in workers:
            ray.kill(worker)


def prepare_search(config: SearchConfig, log: Callable[[str], None] = print) -> tuple[optuna.Study, int]:
    """Record the config beside the results, open the study, requeue interrupted trials; returns the study
    and how many trials are left to run."""
    ensure_storage_folder(config.storage)
    search_dir = search_folder(config)
    search_dir.mkdir(parents=True, exist_ok=True)
    (search_dir / CONFIG_FILE).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    study = open_study(config)
    requeued = requeue_interrupted(study)
    done = finished_count(study)
    if requeued or done:
        log(f"resuming {config.name}: {done} trials finished, {requeued} interrupted trials queued again")
    return study, max(0, config.trials - done)


def search_folder(config: SearchConfig) -> Path:
    return Path(config.results_dir).absolute() / config.name


def run_search(
    config: SearchConfig,
    workers: list,
    on_trial_finished: Callable[[optuna.Study], None] | None = None,
    log: Callable[[str], None] = print,
) -> optuna.Study:
    """Run (or continue) the search to its budget on `workers`; returns the Optuna study."""
    study, remaining = prepare_search(config, log)
    if remaining == 0:
        log(f"{config.name}: all {config.trials} trials already finished")
        return study
    done = config.trials - remaining
    num_layers = ray.get(workers[0].num_layers.remote())
    free_workers = Queue()
    for index in range(len(workers)):
        free_workers.put(index)
    define_by_run = DefineByRun(config, num_layers)
    objectives = config.objectives
    # A fresh search starts from each method's standard recipe; a resumed one has run (or queued) them already.
    warm_start = config.warm_start and config.sampler != "grid" and not study.trials
    searcher = ConstrainedOptunaSearch(
        space=define_by_run,
        points_to_evaluate=standard_points(config, num_layers)[:remaining] if warm_start else None,
        metric=objectives.names(),
        mode=["max" if d == "maximize" else "min" for d in objectives.directions()],
        sampler=make_sampler(config, trials_so_far=len(study.trials)),
        study_name=config.name,
        storage=optuna.storages.RDBStorage(config.storage),
        seed=config.seed,
        search_config=config,
    )
    finished = (lambda: on_trial_finished(study)) if on_trial_finished else None
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, workers=workers, free_workers=free_workers), {"cpu": 0.01}
    )
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            num_samples=remaining,
            max_concurrent_trials=len(workers),
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=f"{config.name}-{int(time.time())}",
            storage_path=str(search_folder(config) / "ray"),
            callbacks=[Progress(config, study, done, finished, log)],
            failure_config=tune.FailureConfig(max_failures=config.max_failures),
            verbose=0,
        ),
    )
    tuner.fit()
    stats = ray.get([worker.stats.remote() for worker in workers])
    (search_folder(config) / "workers.json").write_text(json.dumps(stats, indent=2))
    return optuna.load_study(study_name=config.name, storage=config.storage)


def load_search_config(name: str, results_dir: Path = Path("artifacts/searches")) -> SearchConfig:
    path = Path(results_dir) / name / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"no search named {name!r} under {results_dir}; start one with `safemerge search run CONFIG`")
    return load_config(path)


def front_of(study: optuna.Study, config: SearchConfig) -> list[Point]:
    return sorted(pareto_front(study_points(study), config.objectives), key=lambda point: point.number)
