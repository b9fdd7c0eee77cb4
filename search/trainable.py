"""The Tune trainable of one search trial: borrow a free worker actor, evaluate the recipe there, report.

A worker whose process dies (killed, out of memory, its node lost) or whose evaluation hangs past the timeout is
an infrastructure fault, not the recipe's: Ray restarts the actor (`max_restarts`, search/trial.py) and the trial
runs again, on whichever worker is free next, within this one Tune trial, so it spends no more of the budget. An
error the recipe causes (a RayTaskError carrying the worker's exception) fails only this trial.

A module of its own that imports Ray only: every Tune trial process imports it when it starts, and the
search's own modules (torch, Optuna, pydantic) would add seconds to the start of every search."""

from __future__ import annotations

import json
import threading
import time

import ray
from ray import tune
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.queue import Empty, Queue


class WorkerFaults(RuntimeError):
    """A trial's evaluation was interrupted by worker faults more times than the search allows."""


def wait_until_up(worker, limit_s: float) -> bool:
    """Whether a restarting worker actor is serving again within `limit_s` (calls to it fail meanwhile)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            ray.get(worker.num_layers.remote(), timeout=max(1.0, deadline - time.monotonic()))
            return True
        except RayActorError:  # still restarting
            time.sleep(1.0)
        except GetTimeoutError:
            break
    return False


def evaluate_on_free_worker(
    recipe: dict,
    fidelity: float,
    workers: list,
    free_workers: Queue,
    faults: list[str],
    *,
    timeout_s: float | None,
    fault_retries: int,
) -> dict:
    """Borrow a free worker, evaluate the recipe on the first `fidelity` of the dev split (again on a fault,
    appended to `faults`), and hand the worker back."""
    # A worker restarting longer than this (engines loading) is taken out of the pool.
    restart_limit_s = timeout_s or 3600.0
    # A trial queued behind a running one (the driver runs two trials per worker, so that no worker
    # waits for Tune between trials) may wait for that trial's whole evaluation and a restart of its worker.
    free_wait_s = 2 * restart_limit_s
    while True:
        try:
            index = free_workers.get(block=True, timeout=free_wait_s)
        except Empty as error:
            raise WorkerFaults(f"no worker was free for {free_wait_s:g} s; faults so far: {faults}") from error
        worker, healthy = workers[index], True
        try:
            return ray.get(worker.evaluate.remote(recipe, "dev", fidelity), timeout=timeout_s)
        except GetTimeoutError:
            # Hung: end the process; as a restartable actor it comes back with fresh engines.
            ray.kill(worker, no_restart=False)
            faults.append(f"worker {index} timed out after {timeout_s:g} s")
            healthy = False
        except RayActorError as error:
            faults.append(f"worker {index} died ({type(error).__name__})")
            healthy = False
        finally:
            # A worker goes back to the pool only once it serves: a dead one is never handed out.
            if healthy or wait_until_up(worker, restart_limit_s):
                free_workers.put(index)
        if len(faults) > fault_retries:
            raise WorkerFaults(
                f"the trial's evaluation was interrupted {len(faults)} times ({'; '.join(faults)}); "
                "raise evaluation.fault_retries or evaluation.trial_timeout_s, or look at the workers' logs"
            )


def recipe_key(recipe: dict) -> str:
    return json.dumps(recipe, sort_keys=True)


def start_head_start(
    recipes: list[dict], fidelity: float, workers: list, free_workers: Queue, restart_limit_s: float
) -> dict[str, tuple]:
    """Start the first rung of the warm-start trials now, before Tune is up, dealt round the workers (an actor runs
    its calls in turn): Tune's start costs seconds, and at zoo scale a search lasts tens of them, so the workers
    would otherwise wait through it. Returns recipe key -> (ObjectRef of the evaluation, worker index), which the
    trials of those recipes read instead of evaluating (`run_trial`); a thread hands each worker back to the pool
    when its last such evaluation ends (after a restart, once it serves again)."""
    indices = [free_workers.get(block=True) for _ in range(min(len(recipes), len(workers)))]
    started: dict[str, tuple] = {}
    for turn, recipe in enumerate(recipes):
        index = indices[turn % len(indices)]
        started[recipe_key(recipe)] = (workers[index].evaluate.remote(recipe, "dev", fidelity), index)

    def hand_back() -> None:
        pending = {ref: index for ref, index in started.values()}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            index = pending.pop(ready[0])
            if index not in pending.values() and wait_until_up(workers[index], restart_limit_s):
                free_workers.put(index)

    threading.Thread(target=hand_back, name="head-start-hand-back", daemon=True).start()
    return started


def head_start_result(
    head_start: tuple, workers: list, faults: list[str], timeout_s: float | None
) -> dict[str, float] | None:
    """The metrics of an evaluation `start_head_start` began; None when its worker died or hung (recorded in
    `faults`: the caller evaluates again on a free worker). An error of the recipe's own is raised, as always."""
    ref, index = head_start
    try:
        return ray.get(ref, timeout=timeout_s)
    except GetTimeoutError:
        ray.kill(workers[index], no_restart=False)
        faults.append(f"worker {index} timed out after {timeout_s:g} s")
    except RayActorError as error:
        faults.append(f"worker {index} died ({type(error).__name__})")
    return None


def run_trial(
    trial_config: dict,
    workers: list,
    free_workers: Queue,
    *,
    timeout_s: float | None,
    fault_retries: int,
    rungs: tuple[float, ...] = (1.0,),
    head_starts: dict[str, tuple] | None = None,
) -> None:
    """Evaluate the recipe on each rung's share of the dev split in turn, reporting a flat dict of metrics after
    each: the search's scheduler may stop the trial at any report (search/fidelity.py). The worker is back in the
    pool before each report, so a trial stopped there holds none. A recipe in `head_starts` takes its first rung
    from the evaluation the driver started before Tune (`start_head_start`); a repeat of a recipe already scored
    reports the figures the searcher gave it, and evaluates nothing."""
    recipe_json = recipe_key(trial_config["recipe"])
    repeat = trial_config.get("repeat_of")  # (search.searcher.REPEAT_OF: this module imports Ray only)
    if repeat is not None:
        tune.report({**repeat["metrics"], "repeat_of": float(repeat["trial"]), "recipe_json": recipe_json})
        return
    faults: list[str] = []
    head_start = (head_starts or {}).get(recipe_json)
    for rung, fidelity in enumerate(rungs):
        metrics = head_start_result(head_start, workers, faults, timeout_s) if rung == 0 and head_start else None
        if metrics is None:
            metrics = evaluate_on_free_worker(
                trial_config["recipe"],
                fidelity,
                workers,
                free_workers,
                faults,
                timeout_s=timeout_s,
                fault_retries=fault_retries,
            )
        tune.report({**metrics, "worker_faults": float(len(faults)), "recipe_json": recipe_json})
