"""Faults injected for real into a running search: a worker's process SIGKILLed mid-trial, a worker's process
stopped (SIGSTOP) so its evaluation hangs. Ray restarts the actor, the interrupted trial runs again within its own
Tune trial, and the search ends with its whole budget COMPLETE and nothing FAILED. On small actors stopped or killed
for real: the evaluations the driver starts before Tune (head starts) hang and their trials still complete; a worker
that stops answering is ended and comes back; the search's end asks its workers again after such faults
(`ask_workers`)."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import optuna
import psutil
import pytest
import ray
from ray import tune
from ray.util.queue import Queue

from safemerge.search.searcher import StudySearcher
from safemerge.search.trainable import WorkerFaults, ask_workers, run_trial, start_head_start, wait_until_up
from tests.driving import SearchDriver
from tests.test_fidelity import fit, space
from tests.test_search import REPO, SAFEMERGE, search_overrides
from tests.unit.support import make_config

BUDGET = 3


def titled(process: psutil.Process, title: str) -> bool:
    try:
        return title in " ".join(process.cmdline())
    except psutil.NoSuchProcess:
        return False


def evaluating_worker(driver: subprocess.Popen) -> psutil.Process | None:
    """The driver's worker process while it runs a trial: Ray titles it `ray::TrialWorker.evaluate_rung`, and so
    are the children it forks (compile workers), so the one whose parent is not."""
    title = "TrialWorker.evaluate"
    for process in psutil.Process(driver.pid).children(recursive=True):
        if titled(process, title) and not titled(process.parent(), title):
            return process
    return None


def fault_mid_trial(tmp_path, zoo_dir, data_dir, name: str, fault: signal.Signals, *extra: str):
    """Run a search of BUDGET trials, send `fault` to the worker once a trial is complete and the next one is being
    evaluated, and return the finished driver's output and the study."""
    storage = f"sqlite:///{tmp_path}/optuna.db"
    args = search_overrides(tmp_path, name, BUDGET, f"sqlite:///{tmp_path}/mlflow.db", zoo_dir, data_dir)
    # 40 prompts a set: a trial evaluates for several seconds, a window the polling below cannot miss.
    args += ["--set", "evaluation.limit=40"]
    driver = SearchDriver([SAFEMERGE, "search", "run", str(REPO / "configs/zoo.yaml"), *args, *extra], tmp_path)
    try:
        # The progress line "[1/BUDGET] ..." comes once the first trial is complete.
        victim, started = None, driver.wait_for_line("[1/")
        deadline = time.time() + 300
        while started and victim is None and driver.running() and time.time() < deadline:
            victim = evaluating_worker(driver.process)
            time.sleep(0.05)
        assert victim is not None, "no trial was being evaluated after the first one completed:\n" + driver.output
        victim.send_signal(fault)
        returncode = driver.finish()
    finally:
        driver.kill()
    assert returncode == 0, driver.output[-3000:]
    return driver.output, optuna.load_study(study_name=name, storage=storage), victim


def gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def assert_whole_budget_complete(study: optuna.Study, output: str) -> None:
    last = [line for line in output.splitlines() if line.startswith(f"[{BUDGET}/{BUDGET}]")]
    assert last and "failed 0" in last[0], output[-2000:]
    states = [trial.state for trial in study.trials]
    assert states == [optuna.trial.TrialState.COMPLETE] * BUDGET, states
    faults = [trial.user_attrs["metrics"]["worker_faults"] for trial in study.trials]
    assert sorted(faults) == [0.0] * (BUDGET - 1) + [1.0], (faults, output[-3000:])  # one trial ran twice


@pytest.mark.vllm
def test_a_worker_killed_mid_trial_is_restarted_and_its_trial_run_again(tmp_path, zoo_dir, data_dir):
    output, study, victim = fault_mid_trial(tmp_path, zoo_dir, data_dir, "killed-worker", signal.SIGKILL)
    assert gone(victim)
    assert_whole_budget_complete(study, output)
    assert "(re-run after 1 worker fault)" in output, output[-2000:]


@pytest.mark.vllm
def test_a_hung_worker_times_out_is_restarted_and_its_trial_run_again(tmp_path, zoo_dir, data_dir):
    # A zoo trial of 40 prompts a set takes several seconds here; 60 s is a hang.
    output, study, victim = fault_mid_trial(
        tmp_path, zoo_dir, data_dir, "hung-worker", signal.SIGSTOP, "--set", "evaluation.trial_timeout_s=60"
    )
    assert gone(victim)  # ended after the timeout, not left stopped
    assert_whole_budget_complete(study, output)
    assert "(re-run after 1 worker fault)" in output, output[-2000:]


class Echo:
    """A worker actor's stand-in: answers with its process id, after `seconds`."""

    def num_layers(self) -> int:  # what `wait_until_up` asks
        return 1

    def pid(self) -> int:
        return os.getpid()

    def echo(self, value: str, seconds: float = 0.0) -> tuple[int, str]:
        time.sleep(seconds)
        return os.getpid(), value


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def signal_soon(pid: int, fault: signal.Signals, after_s: float = 1.0) -> None:
    threading.Timer(after_s, os.kill, (pid, fault)).start()


@pytest.mark.parametrize("fault", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "stopped"])
def test_the_searchs_end_asks_a_faulted_worker_again_once_it_serves(local_ray, fault):
    worker = ray.remote(max_restarts=-1, max_task_retries=0)(Echo).remote()
    first = psutil.Process(ray.get(worker.pid.remote()))
    signal_soon(first.pid, fault)
    # A 4 s call, interrupted after 1 s; a stopped worker is ended at the 8 s timeout, as a hung trial's is.
    [(pid, value)] = ask_workers([worker], [("echo", ("front", 4.0))], timeout_s=8.0, limit_s=120.0)
    assert value == "front"
    assert pid != first.pid
    assert gone(first)
    ray.kill(worker)


def test_a_call_to_a_worker_that_never_comes_back_goes_to_the_next_one(local_ray):
    dead, alive = (ray.remote(max_restarts=0)(Echo).remote() for _ in range(2))
    dead_pid, alive_pid = ray.get([dead.pid.remote(), alive.pid.remote()])
    os.kill(dead_pid, signal.SIGKILL)
    answers = ask_workers([dead, alive], [("echo", ("a",)), ("echo", ("b",))], timeout_s=None, limit_s=10.0)
    assert answers == [(alive_pid, "a"), (alive_pid, "b")]
    with pytest.raises(WorkerFaults, match="did not answer 1 call"):
        ask_workers([dead], [("echo", ("c",))], timeout_s=None, limit_s=3.0)
    ray.kill(alive)


@ray.remote(max_restarts=-1, max_task_retries=0)
class StoppableWorker:
    """A worker actor's interface (search/trial.py) over a stand-in scoring (safety and domain both the recipe's
    `x`), restartable as the search's workers are, whose process a test stops."""

    def pid(self) -> int:
        return os.getpid()

    def num_layers(self) -> int:
        return 2

    def evaluate_rung(self, recipe: dict, split: str, fidelity: float, scored=None) -> tuple[dict, float]:
        time.sleep(1.0)
        metrics = {name: recipe["x"] for name in ("safety", "domain")}
        return {**metrics, "over_refusal": 0.0, "fidelity": fidelity}, fidelity


def test_head_started_evaluations_that_hang_are_ended_and_their_trials_run_again(local_ray, tmp_path):
    config = make_config()
    worker = StoppableWorker.remote()
    first = psutil.Process(ray.get(worker.pid.remote()))
    free_workers = Queue()
    free_workers.put(0)
    warm = [{"x": 0.3}, {"x": 0.6}]
    study = optuna.create_study(directions=config.objectives.directions())
    searcher = StudySearcher(
        study, space, config.objectives, ["safety", "domain", "over_refusal", "worker_faults"], points_to_evaluate=warm
    )
    recipes = [space(optuna.trial.FixedTrial(point))["recipe"] for point in warm]
    head_starts = start_head_start(recipes, (1.0,), [worker], free_workers, timeout_s=10.0)
    first.send_signal(signal.SIGSTOP)  # both head starts, dealt to the one worker, hang
    trainable = tune.with_parameters(
        run_trial, workers=[worker], free_workers=free_workers, timeout_s=10.0, fault_retries=2, head_starts=head_starts
    )
    fit(trainable, searcher, tmp_path, trials=2, concurrent=2)

    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert [t.user_attrs["metrics"]["safety"] for t in study.trials] == [0.3, 0.6]
    assert all(t.user_attrs["metrics"]["worker_faults"] >= 1 for t in study.trials)  # each head start was lost
    assert gone(first)
    ray.kill(worker)


def test_a_worker_that_stops_answering_is_ended_and_comes_back(local_ray):
    worker = ray.remote(max_restarts=-1, max_task_retries=0)(Echo).remote()
    first = psutil.Process(ray.get(worker.pid.remote()))
    first.send_signal(signal.SIGSTOP)  # alive to Ray, which counts no fault in it
    assert wait_until_up(worker, limit_s=120.0, silent_limit_s=5.0)
    assert ray.get(worker.pid.remote()) != first.pid
    assert gone(first)
    ray.kill(worker)
