"""The search driver: Ray Tune with an Optuna study on a persistent storage, trials on worker actors.

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
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import optuna
import ray
import sqlalchemy
import yaml
from ray import tune
from ray.util.queue import Queue

from safemerge.errors import UserError
from safemerge.files import write_text_atomic
from safemerge.search.budget import SearchClock, exhausted, format_spend, spend_of
from safemerge.search.config import SearchConfig, load_config
from safemerge.search.fidelity import ParetoHalving
from safemerge.search.pareto import Point, hypervolume, pareto_front
from safemerge.search.progress import SearchConsole, libraries_verbose
from safemerge.search.samplers import make_sampler
from safemerge.search.searcher import DriverSide, StudySearcher
from safemerge.search.secrets import STORAGE_PASSWORD_ENV, rdb_storage
from safemerge.search.space import grid_recipe, standard_points, suggest_recipe
from safemerge.search.trainable import REPEAT_OF, restart_limit_s, run_trial, serves_again, start_head_start
from safemerge.search.trial import trial_metric_names

CONFIG_FILE = "config.yaml"


class DefineByRun:
    """The search space as the searcher asks for it: a picklable callable of an Optuna trial that returns Tune's
    trial config, the recipe."""

    def __init__(self, config: SearchConfig, num_layers: int) -> None:
        self.config, self.num_layers = config, num_layers

    def __call__(self, trial: optuna.Trial) -> dict:
        recipe_for = grid_recipe if self.config.sampler == "grid" else suggest_recipe
        return {"recipe": recipe_for(trial, self.config, self.num_layers)}


def study_points(study: optuna.Study) -> list[Point]:
    """Every completed trial as a Pareto point, but repeats of an earlier trial's recipe (the same point)."""
    points = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        metrics = trial.user_attrs.get("metrics")
        if metrics is None or REPEAT_OF in trial.user_attrs:
            continue
        points.append(Point(trial.number, metrics, all(v <= 0 for v in trial.user_attrs.get("constraint", [0.0]))))
    return points


class Progress(DriverSide, tune.Callback):
    """One line per finished trial: done/total, failures, current hypervolume, the spend against the budget; on a
    terminal, above the search's progress bar (search/progress.py). `on_finished` hooks in."""

    driver_only = ("config", "study", "clock", "on_finished", "log", "console")

    def __init__(
        self,
        config: SearchConfig,
        study: optuna.Study,
        already_done: int,
        on_finished: Callable[[], None] | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        self.config, self.study, self.done, self.on_finished, self.log = config, study, already_done, on_finished, log
        self.failed = self.pruned = 0
        self.clock = SearchClock(study)
        self.budget_reached: str | None = None
        self.console = SearchConsole(config, spend_of(study, self.clock.seconds()), log)

    def spend_exhausted(self, running: int = 0) -> str | None:
        """The budget limit the search has reached, its `running` trials counted at the mean cost of the
        finished ones (said once, when first found), or None; the searcher asks before each trial it starts."""
        reached = exhausted(self.config, spend_of(self.study, self.clock.seconds()).committed(running))
        if reached is not None and self.budget_reached is None:
            self.budget_reached = reached
            self.console.say(
                f"{self.config.name}: budget of {reached} reached, counting the trials still running; "
                "no new trial starts"
            )
        return reached

    def _line(self, what: str) -> None:
        self.done += 1
        self.clock.record()
        volume = hypervolume(study_points(self.study), self.config.objectives)
        spend = spend_of(self.study, self.clock.seconds())
        line = (
            f"[{self.done}/{self.config.trials}] {what} | failed {self.failed}"
            f"{f' | pruned {self.pruned}' if self.pruned else ''} | hypervolume {volume:.4f} | "
            f"{format_spend(self.config, spend)}"
        )
        self.console.trial_finished(line, self.done, self.pruned, self.failed, spend, volume)
        if self.on_finished is not None:
            self.on_finished()

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        result = trial.last_result
        shown = ", ".join(f"{k} {result[k]:.2f}" for k in self.config.objectives.names() if k in result)
        faults = int(result.get("worker_faults", 0))
        rerun = f" (re-run after {faults} worker fault{'s' if faults > 1 else ''})" if faults else ""
        fidelity = result.get("fidelity", 1.0)
        if REPEAT_OF in result:
            rerun += f" (the recipe of trial {int(result[REPEAT_OF])}: its figures, not evaluated again)"
        if fidelity < 1.0:
            self.pruned += 1
            rerun += f" (pruned at {fidelity:g} of the dev split)"
        self._line(f"{trial.config['recipe']['merge_method']}: {shown}{rerun}")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.failed += 1
        self._line(f"{trial.config['recipe']['merge_method']}: FAILED")


def open_study(
    config: SearchConfig,
    storage: optuna.storages.BaseStorage | None = None,
    sampler: optuna.samplers.BaseSampler | None = None,
) -> optuna.Study:
    return optuna.create_study(
        study_name=config.name,
        storage=storage or rdb_storage(config.storage),
        sampler=sampler,
        load_if_exists=True,
        directions=config.objectives.directions(),
    )


def requeue_interrupted(study_name: str, storage: optuna.storages.BaseStorage) -> int:
    """Trials left RUNNING by a killed driver go back to WAITING with their parameters: the next ask()
    picks them up, so they run again under their own number instead of being lost or duplicated. Called by the
    driver that holds the search's lease (search/lease.py), which it took from no driver or a dead one only."""
    study_id = storage.get_study_id_from_name(study_name)
    stale = storage.get_all_trials(study_id, deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for trial in stale:
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        storage.set_trial_state_values(trial_id, optuna.trial.TrialState.WAITING)
    return len(stale)


def finished_count(study: optuna.Study) -> int:
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL, optuna.trial.TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=states))


def ensure_storage_folder(storage: str) -> None:
    if storage.startswith("sqlite:///"):
        Path(storage[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)


def open_storage(config: SearchConfig) -> tuple[optuna.storages.RDBStorage, optuna.Study]:
    """The search's Optuna storage and its study, created if it is new."""
    ensure_storage_folder(config.storage)
    try:
        storage = rdb_storage(config.storage)
    except sqlalchemy.exc.OperationalError as error:  # refused, unknown host, bad password: one line
        reason = str(error.orig).strip().splitlines()[0] if error.orig else type(error).__name__
        raise UserError(
            f"storage {config.storage}: {reason}; check that the database runs and its URL, and give its password "
            f"in the URL or in {STORAGE_PASSWORD_ENV}"
        ) from None
    return storage, open_study(config, storage)


class WorkerPool(Sequence):
    """The config's worker actors, started (Ray too, local unless RAY_ADDRESS names a cluster) on first use: the
    resume of a finished search, whose front a finalize has tested and recorded, loads no model and starts no
    engine (minutes at real scale). A sequence of actor handles once started."""

    def __init__(self, config: SearchConfig) -> None:
        self.config = config
        self._workers: list | None = None

    @property
    def started(self) -> bool:
        return self._workers is not None

    def _started(self) -> list:
        if self._workers is None:
            from safemerge.search.trial import start_workers

            if not ray.is_initialized():
                # "local" unless RAY_ADDRESS is set (as inside a Ray job): never a cluster that a stale
                # /tmp/ray/ray_current_cluster file names.
                address = os.environ.get("RAY_ADDRESS") or "local"
                # A local Ray offers one more logical CPU than the workers take: Tune's trial coordinators (0.01
                # CPU each) must fit beside them, or a search with one worker per core never schedules a trial.
                count, cpus = self.config.workers.count, self.config.workers.cpus
                needed = math.ceil(count * cpus) + 1 if count != "auto" else 0
                ray.init(
                    address=address,
                    num_cpus=max(os.cpu_count() or 1, needed) if address == "local" else None,
                    include_dashboard=False,
                    # The workers' output (vLLM's engine logs, prefixed `(TrialWorker pid=...)`) only with
                    # --verbose: a worker's error reaches the console as its trial's failure.
                    log_to_driver=libraries_verbose(),
                    configure_logging=False,
                )
            self._workers = start_workers(self.config)
        return self._workers

    def __getitem__(self, index):
        return self._started()[index]

    def __len__(self) -> int:
        return len(self._started())

    def close(self) -> None:
        for worker in self._workers or []:
            ray.kill(worker)
        self._workers = None


@contextlib.contextmanager
def worker_pool(config: SearchConfig) -> Iterator[WorkerPool]:
    """The config's worker pool (started on first use), its actors killed on exit."""
    pool = WorkerPool(config)
    try:
        yield pool
    finally:
        pool.close()


def prepare_search(config: SearchConfig, log: Callable[[str], None] = print) -> tuple[optuna.Study, int]:
    """Record the config beside the results, open the study, requeue interrupted trials; returns the study
    and how many trials are left to run."""
    search_dir = search_folder(config)
    search_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(search_dir / CONFIG_FILE, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    storage, study = open_storage(config)
    requeued = requeue_interrupted(config.name, storage)
    done = finished_count(study)
    if requeued or done:
        log(f"resuming {config.name}: {done} trials finished, {requeued} interrupted trials queued again")
    return study, max(0, config.trials - done)


def search_folder(config: SearchConfig) -> Path:
    return Path(config.results_dir).absolute() / config.name


def run_search(
    config: SearchConfig,
    workers: Sequence,
    on_trial_finished: Callable[[optuna.Study], None] | None = None,
    log: Callable[[str], None] = print,
) -> optuna.Study:
    """Run (or continue) the search to its budget on `workers` (actor handles, or a WorkerPool, which starts only
    when trials remain); returns the Optuna study."""
    study, remaining = prepare_search(config, log)
    if remaining == 0:
        log(f"{config.name}: all {config.trials} trials already finished")
        return study
    done = config.trials - remaining
    finished = (lambda: on_trial_finished(study)) if on_trial_finished else None
    progress = Progress(config, study, done, finished, log)
    if progress.spend_exhausted() is not None:  # a resumed search whose budget is spent: nothing to run
        return study
    workers = list(workers)  # the actor handles (a WorkerPool starts here): Tune's trial processes get these
    num_layers = ray.get(workers[0].num_layers.remote())
    free_workers = Queue()
    for index in range(len(workers)):
        free_workers.put(index)
    define_by_run = DefineByRun(config, num_layers)
    objectives = config.objectives
    # A fresh search starts from each method's standard recipe; a resumed one has run (or queued) them already.
    warm_start = config.warm_start and config.sampler != "grid" and not study.trials
    warm_points = standard_points(config, num_layers)[:remaining] if warm_start else []
    searcher = StudySearcher(
        open_study(config, sampler=make_sampler(config, trials_so_far=len(study.trials))),
        define_by_run,
        objectives,
        trial_metric_names(config),
        points_to_evaluate=warm_points,
        budget_exhausted=progress.spend_exhausted,
    )
    # The warm-start trials' evaluations, every rung, start now, dealt round the idle workers, while Tune starts.
    head_starts = start_head_start(
        [define_by_run(optuna.trial.FixedTrial(point))["recipe"] for point in warm_points],
        config.evaluation.rungs,
        workers,
        free_workers,
        timeout_s=config.evaluation.trial_timeout_s,
    )
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial,
            workers=workers,
            free_workers=free_workers,
            timeout_s=config.evaluation.trial_timeout_s,
            fault_retries=config.evaluation.fault_retries,
            rungs=tuple(config.evaluation.rungs),
            head_starts=head_starts,
        ),
        {"cpu": 0.01},
    )
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=ParetoHalving(objectives, lambda: study_points(study))
            if len(config.evaluation.rungs) > 1
            else None,
            num_samples=remaining,
            # One trial queued per worker beside the running one: it is asked and started while the worker is
            # busy and takes it the moment it is free, so Tune's per-trial start (seconds) never idles a worker.
            max_concurrent_trials=2 * len(workers),
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=f"{config.name}-{int(time.time())}",
            storage_path=str(search_folder(config) / "ray"),
            callbacks=[progress],
            failure_config=tune.FailureConfig(max_failures=config.max_failures),
            # Tune's experiment box and status tables only with --verbose: the search's own bar says it.
            verbose=1 if libraries_verbose() else 0,
        ),
    )
    with progress.console.showing():
        tuner.fit()
    stats = [worker_stats(worker, config.evaluation.trial_timeout_s) for worker in workers]
    (search_folder(config) / "workers.json").write_text(json.dumps(stats, indent=2))
    return optuna.load_study(study_name=config.name, storage=rdb_storage(config.storage))


def worker_stats(worker, timeout_s: float | None) -> dict:
    """A worker's busy-time figures, once it serves: a worker that a fault restarted in the last trial (killed, or
    ended for hanging) is waited for, as finalize needs it next; one that does not come back is recorded so."""
    if serves_again(worker, timeout_s):
        with contextlib.suppress(ray.exceptions.RayActorError):
            return ray.get(worker.stats.remote())
    return {"unavailable": f"the worker did not serve again within {restart_limit_s(timeout_s):g} s"}


def load_search_config(
    name: str, results_dir: Path = Path("artifacts/searches"), overrides: dict | None = None
) -> SearchConfig:
    path = Path(results_dir) / name / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"no search named {name!r} under {results_dir}; start one with `safemerge search run CONFIG`")
    return load_config(path, overrides)


def front_of(study: optuna.Study, config: SearchConfig) -> list[Point]:
    return sorted(pareto_front(study_points(study), config.objectives), key=lambda point: point.number)
