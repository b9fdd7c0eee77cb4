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
from collections.abc import Sequence

import ray
from ray import tune
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.queue import Empty, Queue


class WorkerFaults(RuntimeError):
    """A trial's evaluation was interrupted by worker faults more times than the search allows."""


# A worker's restart loads its engines: under a minute at zoo scale, minutes at real scale or on a loaded machine;
# unrelated to how long a trial may take, which is all the wait allowed before.
RESTART_ALLOWANCE_S = 600.0


def hung_after_s(timeout_s: float | None) -> float:
    """How long a worker may go without answering before it counts as hung: the trial timeout (an hour if none)."""
    return timeout_s or 3600.0


def restart_limit_s(timeout_s: float | None) -> float:
    """How long a worker a fault hit is waited for: long enough to tell it hangs, then for its restart."""
    return hung_after_s(timeout_s) + RESTART_ALLOWANCE_S


def answers_within(worker, limit_s: float) -> bool:
    """Whether a worker actor answers a call within `limit_s` (calls to a restarting one fail meanwhile)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            ray.get(worker.num_layers.remote(), timeout=max(1.0, deadline - time.monotonic()))
            return True
        except RayActorError:  # restarting, or not reachable
            time.sleep(1.0)
        except GetTimeoutError:
            break
    return False


def wait_until_up(worker, limit_s: float, silent_limit_s: float | None = None) -> bool:
    """Whether a worker actor a fault hit serves again within `limit_s`. One that has not answered for
    `silent_limit_s` (all of `limit_s` when None) is ended: its process is alive but does not serve (stopped,
    deadlocked), which Ray does not count as a fault, so it would never restart by itself; as a restartable actor
    it comes back with fresh engines, and is waited for the rest of `limit_s`."""
    deadline = time.monotonic() + limit_s
    if answers_within(worker, min(silent_limit_s or limit_s, limit_s)):
        return True
    ray.kill(worker, no_restart=False)
    return answers_within(worker, deadline - time.monotonic())


def serves_again(worker, timeout_s: float | None) -> bool:
    """`wait_until_up` by a trial timeout's rules: ended once silent for the timeout, then given its restart."""
    return wait_until_up(worker, restart_limit_s(timeout_s), hung_after_s(timeout_s))


def ask_workers(workers: list, calls: list[tuple[str, tuple]], timeout_s: float | None, limit_s: float) -> list:
    """The results of `calls` ((method name, arguments), dealt round the workers) once each has answered. A call
    interrupted by its worker's fault (dead, restarting, or hung past `timeout_s`, then ended) is asked again of
    that worker once it serves, else of the next one, for up to `limit_s` in all: the search's end must not fail
    on a worker a fault hit in its last trial. The calls must be safe to repeat (they may or may not have run).
    An error of the call's own is raised."""
    deadline = time.monotonic() + limit_s
    results: list = [None] * len(calls)
    pending = {index: index % len(workers) for index in range(len(calls))}
    faults: list[str] = []
    while pending:
        refs = {
            index: getattr(workers[worker], calls[index][0]).remote(*calls[index][1])
            for index, worker in pending.items()
        }
        interrupted: dict[int, int] = {}
        for index, ref in refs.items():
            answer = await_evaluation(ref, workers, pending[index], faults, timeout_s)
            if answer is None:
                interrupted[index] = pending[index]
            else:
                results[index] = answer
        if interrupted and time.monotonic() >= deadline:
            raise WorkerFaults(
                f"the workers did not answer {len(interrupted)} call(s) within {limit_s:g} s ({'; '.join(faults)}); "
                "finalize again with `safemerge search resume NAME` once they serve"
            )
        for index, worker in interrupted.items():
            # The same worker once it serves again, else the next one round.
            if not wait_until_up(workers[worker], max(1.0, deadline - time.monotonic()), hung_after_s(timeout_s)):
                interrupted[index] = (worker + 1) % len(workers)
        pending = interrupted
    return results


def await_evaluation(evaluation, workers: list, index: int, faults: list[str], timeout_s: float | None):
    """The result of worker `index`'s `evaluation` (an ObjectRef, or a list of them for a call with several
    returns; never None itself); None when the worker died or hung, recorded in `faults` (a hung one is ended: as a
    restartable actor it comes back with fresh engines). An error of the recipe's own is raised."""
    try:
        return ray.get(evaluation, timeout=timeout_s)
    except GetTimeoutError:
        ray.kill(workers[index], no_restart=False)
        faults.append(f"worker {index} timed out after {timeout_s:g} s")
    except RayActorError as error:  # dead, restarting, or (ActorUnavailableError) not answering
        faults.append(f"worker {index} died or did not answer ({type(error).__name__})")
    return None


def evaluate_on_free_worker(
    recipe: dict,
    fidelity: float,
    workers: list,
    free_workers: Queue,
    faults: list[str],
    *,
    timeout_s: float | None,
    fault_retries: int,
    scored=None,
) -> tuple[dict, object]:
    """Borrow a free worker, evaluate the recipe on the first `fidelity` of the dev split, continuing from
    `scored` (the share an earlier rung scored; again on a fault, appended to `faults`), and hand the worker back.
    Returns the metrics and the share now scored (opaque here: search/trial.py's ScoredShare)."""
    # A trial queued behind a running one (the driver runs two trials per worker, so that no worker waits for Tune
    # between trials) may wait for that trial's whole evaluation and then its worker's restart.
    free_wait_s = hung_after_s(timeout_s) + restart_limit_s(timeout_s)
    while True:
        try:
            index = free_workers.get(block=True, timeout=free_wait_s)
        except Empty as error:
            raise WorkerFaults(f"no worker was free for {free_wait_s:g} s; faults so far: {faults}") from error
        healthy = True  # also when the recipe's own error is raised: the worker serves on
        try:
            answer = await_evaluation(
                workers[index].evaluate_rung.remote(recipe, "dev", fidelity, scored), workers, index, faults, timeout_s
            )
            healthy = answer is not None
        finally:
            # A worker goes back to the pool only once it serves: a dead one, or one that does not come back from
            # its restart in time, is never handed out.
            if healthy or serves_again(workers[index], timeout_s):
                free_workers.put(index)
        if answer is not None:
            return answer
        if len(faults) > fault_retries:
            raise WorkerFaults(
                f"the trial's evaluation was interrupted {len(faults)} times ({'; '.join(faults)}); "
                "raise evaluation.fault_retries or evaluation.trial_timeout_s, or look at the workers' logs"
            )


# A trial whose recipe an earlier trial scored carries that trial's number and figures under this key in its Tune
# config, reports the number under it, and keeps it as a user attribute (search.driver.study_points leaves such
# trials out of the front). Defined here, as this module imports Ray only.
REPEAT_OF = "repeat_of"


def recipe_key(recipe: dict) -> str:
    """A recipe as one comparable string: the form trials report it in (`recipe_json`)."""
    return json.dumps(recipe, sort_keys=True)


def start_head_start(
    recipes: list[dict], rungs: Sequence[float], workers: list, free_workers: Queue, timeout_s: float | None
) -> dict[str, tuple]:
    """Start the warm-start trials' evaluations now, before Tune is up, dealt round the workers (an actor runs its
    calls in turn): Tune's start costs seconds, and at zoo scale a search lasts tens of them, so the workers would
    otherwise wait through it. Every rung is started, each continuing from the one before (the first rungs of a
    worker's recipes first, so their trials can report early); a warm start is a method's standard recipe, which
    the scheduler stops at a rung only when it breaks a constraint, so a later rung is seldom evaluated in vain.
    Returns recipe key -> (one [metrics, scored share] pair of ObjectRefs per rung, worker index), which the trials
    of those recipes read instead of evaluating (`run_trial`); a thread hands each worker back to the pool when
    its last such evaluation ends (after a restart, once it serves again)."""
    indices = [free_workers.get(block=True) for _ in range(min(len(recipes), len(workers)))]
    chains: dict[str, tuple[list, int]] = {}
    for fidelity in rungs:
        for turn, recipe in enumerate(recipes):
            index = indices[turn % len(indices)]
            chain = chains.setdefault(recipe_key(recipe), ([], index))[0]
            scored = chain[-1][1] if chain else None  # resolved by Ray when the previous rung ends
            evaluate = workers[index].evaluate_rung.options(num_returns=2)
            chain.append(evaluate.remote(recipe, "dev", fidelity, scored))

    def hand_back() -> None:
        pending = {metrics: index for chain, index in chains.values() for metrics, _ in chain}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            index = pending.pop(ready[0])
            if index not in pending.values() and serves_again(workers[index], timeout_s):
                free_workers.put(index)

    threading.Thread(target=hand_back, name="head-start-hand-back", daemon=True).start()
    return chains


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
    pool before each report, so a trial stopped there holds none. A recipe in `head_starts` takes its rungs from the
    evaluations the driver started before Tune (`start_head_start`); a repeat of a recipe already scored
    reports the figures the searcher gave it, and evaluates nothing."""
    recipe_json = recipe_key(trial_config["recipe"])
    repeat = trial_config.get(REPEAT_OF)
    if repeat is not None:
        tune.report({**repeat["metrics"], REPEAT_OF: float(repeat["trial"]), "recipe_json": recipe_json})
        return
    faults: list[str] = []
    chain, index = (head_starts or {}).get(recipe_json, ([], None))
    scored = None  # what the rungs so far scored: the next rung, on whichever worker is free, adds to it
    for rung, fidelity in enumerate(rungs):
        answer = None
        if rung < len(chain):
            answer = await_evaluation(chain[rung], workers, index, faults, timeout_s)
            if answer is None:  # its worker died or hung (a fault): this rung and the rest run on free workers
                chain = []
        if answer is None:
            answer = evaluate_on_free_worker(
                trial_config["recipe"],
                fidelity,
                workers,
                free_workers,
                faults,
                timeout_s=timeout_s,
                fault_retries=fault_retries,
                scored=scored,
            )
        metrics, scored = answer
        tune.report({**metrics, "worker_faults": float(len(faults)), "recipe_json": recipe_json})
