"""The Tune trainable of one search trial: borrow a free worker actor, evaluate the recipe there, report.

A worker whose process dies (killed, out of memory, its node lost) or whose evaluation hangs past the timeout is
an infrastructure fault, not the recipe's: Ray restarts the actor (`max_restarts`, search/trial.py) and the trial
runs again, on whichever worker is free next, within this one Tune trial, so it spends no more of the budget. An
error the recipe causes (a RayTaskError carrying the worker's exception) fails only this trial.

A module of its own that imports Ray only: every Tune trial process imports it when it starts, and the
search's own modules (torch, Optuna, pydantic) would add seconds to the start of every search."""

from __future__ import annotations

import json
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


def run_trial(
    trial_config: dict, workers: list, free_workers: Queue, *, timeout_s: float | None, fault_retries: int
) -> None:
    """Borrow a free worker, evaluate the recipe there (again on a fault), report a flat dict of metrics."""
    faults: list[str] = []
    # A worker restarting longer than this (engines loading) is taken out of the pool.
    restart_limit_s = timeout_s or 3600.0
    while True:
        try:
            index = free_workers.get(block=True, timeout=restart_limit_s)
        except Empty as error:
            raise WorkerFaults(f"no worker was free for {restart_limit_s:g} s; faults so far: {faults}") from error
        worker, healthy = workers[index], True
        try:
            metrics = ray.get(worker.evaluate.remote(trial_config["recipe"]), timeout=timeout_s)
            break
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
    recipe_json = json.dumps(trial_config["recipe"], sort_keys=True)
    tune.report({**metrics, "worker_faults": float(len(faults)), "recipe_json": recipe_json})
