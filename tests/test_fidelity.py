"""The multi-fidelity scheduler in a real Ray Tune run over a real Optuna study: trials report a rung at a time;
those whose optimistic bounds a feasible full-split trial dominates stop at their first rung and are recorded as
pruned, with their partial figures; the others run to the whole split and complete. A budget in generated tokens
ends a real Tune run: no trial starts once it is spent, the running ones finish. And the trainable takes the
first trials' evaluations that the driver started on the workers before Tune, evaluating nothing twice."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import optuna
import pytest
import ray
from ray import tune

from safemerge.search.budget import spend_of
from safemerge.search.driver import Progress, study_points
from safemerge.search.fidelity import ParetoHalving
from safemerge.search.searcher import StudySearcher
from safemerge.search.trainable import run_trial, start_head_start

from .unit.support import make_config

RUNGS = (0.25, 1.0)
HALF_WIDTH = 0.02


def space(trial: optuna.Trial) -> dict:
    return {"recipe": {"merge_method": "linear", "x": trial.suggest_float("x", 0.0, 1.0)}}


TOKENS_PER_RUNG = 100


def rung_trainable(trial_config: dict) -> None:
    """A stand-in for the worker's scoring: safety and domain both `x`, known to +/- HALF_WIDTH at every rung."""
    x = trial_config["recipe"]["x"]
    for fidelity in RUNGS:
        metrics = {"over_refusal": 0.0, "over_refusal_lo": 0.0, "over_refusal_hi": 0.05}
        for name in ("safety", "domain"):
            metrics.update({name: x, f"{name}_lo": x - HALF_WIDTH, f"{name}_hi": x + HALF_WIDTH})
        recipe_json = json.dumps(trial_config["recipe"], sort_keys=True)
        tokens = TOKENS_PER_RUNG * (RUNGS.index(fidelity) + 1)  # cumulative, as a worker reports it
        tune.report({**metrics, "fidelity": fidelity, "generated_tokens": tokens, "recipe_json": recipe_json})


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def test_dominated_trials_stop_at_their_first_rung_and_are_recorded_pruned(local_ray, tmp_path):
    config = make_config(**{"evaluation.rungs": list(RUNGS)})
    names = [
        "safety",
        "domain",
        "over_refusal",
        "fidelity",
        *(f"{n}_{b}" for n in ("safety", "domain") for b in ("lo", "hi")),
    ]
    study = optuna.create_study(
        directions=config.objectives.directions(), sampler=optuna.samplers.RandomSampler(seed=0)
    )
    searcher = StudySearcher(study, space, config.objectives, names, points_to_evaluate=[{"x": 0.9}])
    scheduler = ParetoHalving(config.objectives, lambda: study_points(study))
    tune.Tuner(
        rung_trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher, scheduler=scheduler, num_samples=12, max_concurrent_trials=1, reuse_actors=True
        ),
        run_config=tune.RunConfig(storage_path=str(tmp_path), verbose=0),
    ).fit()

    states = {trial.number: trial.state for trial in study.trials}
    assert len(states) == 12 and states[0] == optuna.trial.TrialState.COMPLETE
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert pruned and len(pruned) + len(completed) == 12, states
    for trial in pruned:  # at best x + 0.02 on both objectives: below trial 0's 0.9
        assert trial.params["x"] + HALF_WIDTH < 0.9
        assert trial.user_attrs["metrics"]["fidelity"] == RUNGS[0]
        assert trial.user_attrs["metrics"]["safety"] == pytest.approx(trial.params["x"])
        assert trial.user_attrs["recipe"]["x"] == trial.params["x"]
    for trial in completed:  # never dominated at its optimistic bound by a full trial that came before it
        assert trial.user_attrs["metrics"]["fidelity"] == 1.0
        earlier = [t.params["x"] for t in completed if t.number < trial.number]
        assert all(trial.params["x"] + HALF_WIDTH >= x for x in earlier)
    assert set(scheduler.stopped.values()) <= {
        f"dominated by trial {t.number} even at its optimistic bounds" for t in completed
    }


def test_a_token_budget_ends_the_search_once_spent_and_lets_running_trials_finish(local_ray, tmp_path):
    budget = 5 * len(RUNGS) * TOKENS_PER_RUNG  # five whole trials' worth
    config = make_config(**{"trials": 40, "budget.generated_tokens": budget})
    study = optuna.create_study(
        directions=config.objectives.directions(), sampler=optuna.samplers.RandomSampler(seed=1)
    )
    lines: list[str] = []
    progress = Progress(config, study, 0, log=lines.append)
    names = ["safety", "domain", "over_refusal", "fidelity", "generated_tokens"]
    searcher = StudySearcher(study, space, config.objectives, names, budget_exhausted=progress.spend_exhausted)
    concurrent = 2
    tune.Tuner(
        rung_trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher, num_samples=config.trials, max_concurrent_trials=concurrent, reuse_actors=True
        ),
        run_config=tune.RunConfig(storage_path=str(tmp_path), callbacks=[progress], verbose=0),
    ).fit()

    states = [trial.state for trial in study.trials]
    assert all(state == optuna.trial.TrialState.COMPLETE for state in states), states
    # Every trial costs the same, so the running ones counted at the mean cost stop the search at exactly five.
    assert len(states) == 5
    assert spend_of(study, 0.0).generated_tokens == budget
    assert f"{config.name}: budget of {budget:,} generated tokens reached" in "\n".join(lines)
    last = [line for line in lines if line.startswith("[")][-1]
    assert last.startswith("[5/40] linear") and f"tokens {budget:,}/{budget:,}" in last


@ray.remote
class CountingWorker:
    """A worker actor's interface (search/trial.py) over the stand-in scoring, recording each evaluation."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, float]] = []
        self.continued: list[tuple[float, float, tuple | None]] = []  # (x, fidelity, the scored share it was given)

    def evaluate_rung(self, recipe: dict, split: str, fidelity: float, scored=None) -> tuple[dict, tuple]:
        self.calls.append((time.time(), recipe["x"]))
        self.continued.append((recipe["x"], fidelity, scored))
        time.sleep(0.3)
        metrics = {name: recipe["x"] for name in ("safety", "domain")}
        return {**metrics, "over_refusal": 0.0, "fidelity": fidelity}, (recipe["x"], fidelity)

    def num_layers(self) -> int:
        return 2

    def evaluations(self) -> list[tuple[float, float]]:
        return self.calls

    def rungs(self) -> list[tuple[float, float, tuple | None]]:
        return self.continued


def timed_run_trial(trial_config: dict, started_dir: str, **options) -> None:
    """The trainable, noting when each Tune trial began (a file per trial: trials run in their own processes)."""
    (Path(started_dir) / f"{os.getpid()}-{time.time()}").write_text("")
    run_trial(trial_config, **options)


def counting_pool(count: int) -> tuple[list, object]:
    """`count` counting workers, up (as the driver's are when a search starts), and the queue of free ones."""
    from ray.util.queue import Queue

    workers = [CountingWorker.remote() for _ in range(count)]
    ray.get([worker.num_layers.remote() for worker in workers])
    free_workers = Queue()
    for index in range(count):
        free_workers.put(index)
    return workers, free_workers


def fit(trainable, searcher: StudySearcher, tmp_path, trials: int, concurrent: int) -> None:
    tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher, num_samples=trials, max_concurrent_trials=concurrent, reuse_actors=True
        ),
        run_config=tune.RunConfig(storage_path=str(tmp_path), verbose=0),
    ).fit()


def test_the_first_trials_take_the_evaluations_started_before_tune(local_ray, tmp_path):
    config = make_config()
    workers, free_workers = counting_pool(2)
    warm = [{"x": 0.3}, {"x": 0.6}, {"x": 0.9}]
    study = optuna.create_study(
        directions=config.objectives.directions(), sampler=optuna.samplers.RandomSampler(seed=2)
    )
    searcher = StudySearcher(
        study, space, config.objectives, ["safety", "domain", "over_refusal"], points_to_evaluate=warm
    )
    head_starts = start_head_start(
        [space(optuna.trial.FixedTrial(point))["recipe"] for point in warm], (1.0,), workers, free_workers, 60.0
    )
    assert {index for _, index in head_starts.values()} == {0, 1}  # dealt round both workers
    started_dir = tmp_path / "trial-starts"
    started_dir.mkdir()
    trainable = tune.with_parameters(
        timed_run_trial,
        started_dir=str(started_dir),
        workers=workers,
        free_workers=free_workers,
        timeout_s=60.0,
        fault_retries=0,
        head_starts=head_starts,
    )
    fit(trainable, searcher, tmp_path, trials=5, concurrent=4)

    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 5
    assert [t.user_attrs["metrics"]["safety"] for t in study.trials[:3]] == [0.3, 0.6, 0.9]
    calls = sorted(call for worker in workers for call in ray.get(worker.evaluations.remote()))
    assert len(calls) == 5  # the head-started evaluations were taken, not run again
    # Both workers were evaluating before Tune's first trial began (the third head start queued behind one).
    first_trial = min(float(path.name.split("-")[1]) for path in started_dir.iterdir())
    assert sorted(x for started, x in calls if started < first_trial)[:2] == [0.3, 0.6], (calls, first_trial)


def test_a_recipe_proposed_again_is_reported_from_its_first_trial_and_not_evaluated(local_ray, tmp_path):
    config = make_config()
    workers, free_workers = counting_pool(1)
    study = optuna.create_study(directions=config.objectives.directions())
    fixed = lambda trial: {"recipe": {"merge_method": "karcher", "x": trial.suggest_float("x", 0.7, 0.7)}}  # noqa: E731
    searcher = StudySearcher(study, fixed, config.objectives, ["safety", "domain", "over_refusal", "generated_tokens"])
    trainable = tune.with_parameters(
        run_trial, workers=workers, free_workers=free_workers, timeout_s=60.0, fault_retries=0
    )
    fit(trainable, searcher, tmp_path, trials=3, concurrent=1)

    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 3
    assert [t.user_attrs.get("repeat_of") for t in study.trials] == [None, 0, 0]
    assert len({tuple(t.values) for t in study.trials}) == 1
    assert len(ray.get(workers[0].evaluations.remote())) == 1  # evaluated once


def test_each_rung_continues_from_the_share_the_trial_scored_on_whichever_worker_runs_it(local_ray, tmp_path):
    config = make_config(**{"evaluation.rungs": list(RUNGS)})
    workers, free_workers = counting_pool(2)
    study = optuna.create_study(
        directions=config.objectives.directions(), sampler=optuna.samplers.RandomSampler(seed=3)
    )
    warm = [{"x": 0.3}, {"x": 0.6}, {"x": 0.9}]
    searcher = StudySearcher(
        study, space, config.objectives, ["safety", "domain", "over_refusal", "fidelity"], points_to_evaluate=warm
    )
    # The warm starts' rungs all start before Tune, each continuing from the one before on its worker.
    head_starts = start_head_start(
        [space(optuna.trial.FixedTrial(point))["recipe"] for point in warm], RUNGS, workers, free_workers, 60.0
    )
    trainable = tune.with_parameters(
        run_trial,
        workers=workers,
        free_workers=free_workers,
        timeout_s=60.0,
        fault_retries=0,
        rungs=RUNGS,
        head_starts=head_starts,
    )
    # Four trials on two workers: other trials' rungs run between a trial's two, on either worker.
    fit(trainable, searcher, tmp_path, trials=7, concurrent=4)

    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 7
    rungs = [call for worker in workers for call in ray.get(worker.rungs.remote())]
    # One evaluation per trial and rung: the head-started ones were taken, not run again.
    assert sorted(fidelity for _, fidelity, _ in rungs) == [RUNGS[0]] * 7 + [RUNGS[1]] * 7
    for x, fidelity, scored in rungs:
        # The first rung starts from nothing; the second is handed what the trial's first rung scored.
        assert scored == (None if fidelity == RUNGS[0] else (x, RUNGS[0])), rungs
