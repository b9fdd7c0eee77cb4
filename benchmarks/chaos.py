"""Chaos: a zoo search of 40 trials on 2 workers while its infrastructure fails for real, and what it lost.

Faults, keyed on the driver's own progress lines ("[k/40] ..."):
- every 8 finished trials, the process of a worker that is evaluating a trial is SIGKILLed (Ray restarts the
  actor; the interrupted trial runs again inside its own Tune trial);
- after trial 12, the MLflow server (a real `mlflow server` on loopback) is stopped for 30 s, then restarted on
  the same port and store;
- after trial 20, the driver's whole process group (the driver and the local Ray it started) is SIGKILLed, and
  the search is resumed with `safemerge search resume` once the dead driver's lease is stale.

Target: 0 trials lost, 0 duplicated, 0 failed, every trial in MLflow exactly once.

Run: .venv/bin/python benchmarks/chaos.py [--trials 40] [--kill-every 8] [--limit 10]
Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import optuna
import psutil
from mlflow.tracking import MlflowClient

from safemerge.cluster.processes import MlflowServer

REPO = Path(__file__).resolve().parents[1]
SAFEMERGE = str(Path(sys.executable).parent / "safemerge")
WORKER_TITLE = "TrialWorker.evaluate"


class Driver:
    """A search driver in its own session whose console is read line by line, echoed with a prefix."""

    def __init__(self, command: list[str], cwd: Path, label: str) -> None:
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd, start_new_session=True
        )
        self.lines: list[str] = []
        self.label = label
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)
            if line.startswith("[") or "MLflow at" in line or "error" in line.lower():
                print(f"  {self.label}: {line.rstrip()[:160]}", flush=True)

    def finished_trials(self) -> int:
        done = [int(line[1:].split("/")[0]) for line in self.lines if line.startswith("[") and "/" in line[:8]]
        return max(done, default=0)

    def evaluating_worker(self) -> psutil.Process | None:
        for process in psutil.Process(self.process.pid).children(recursive=True):
            try:
                if WORKER_TITLE in " ".join(process.cmdline()) and WORKER_TITLE not in " ".join(
                    process.parent().cmdline()
                ):
                    return process
            except psutil.Error:
                continue
        return None

    def kill_group(self) -> None:
        """SIGKILL the driver, its session and every process it started (Ray's, whatever session they took)."""
        try:
            descendants = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.Error:
            descendants = []
        os.killpg(self.process.pid, signal.SIGKILL)
        for process in descendants:
            try:
                process.kill()
            except psutil.Error:
                pass
        self.process.wait()


def run_with_faults(driver: Driver, state: dict, args, server: MlflowServer) -> None:
    """Inject the schedule's faults into `driver` until it ends (or is killed by the schedule)."""
    while driver.process.poll() is None:
        done = driver.finished_trials()
        due = done // args.kill_every * args.kill_every
        if due and due > state["last_worker_kill"] and done < args.trials:
            victim = driver.evaluating_worker()
            if victim is not None:
                victim.send_signal(signal.SIGKILL)
                state["last_worker_kill"] = due
                state["worker_kills"] += 1
                print(f"chaos: after trial {done}: SIGKILLed worker process {victim.pid}", flush=True)
        if done >= args.mlflow_down_after and state["mlflow_stopped_at"] is None:
            server.stop()
            state["mlflow_stopped_at"] = time.monotonic()
            print(f"chaos: after trial {done}: MLflow server stopped", flush=True)
        if state["mlflow_stopped_at"] and not state["mlflow_restarted"]:
            if time.monotonic() - state["mlflow_stopped_at"] >= args.mlflow_down_s:
                server.start()
                state["mlflow_restarted"] = True
                print(f"chaos: MLflow server back after {args.mlflow_down_s:g} s", flush=True)
        if done >= args.driver_kill_after and not state["driver_killed"]:
            driver.kill_group()
            state["driver_killed"] = True
            print(f"chaos: after trial {done}: driver and its Ray SIGKILLed", flush=True)
            return
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs/zoo.yaml")
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--kill-every", type=int, default=8, help="SIGKILL a worker every N finished trials")
    parser.add_argument("--mlflow-down-after", type=int, default=12)
    parser.add_argument("--mlflow-down-s", type=float, default=30.0)
    parser.add_argument("--driver-kill-after", type=int, default=20)
    parser.add_argument("--lease-timeout-s", type=float, default=15.0)
    parser.add_argument("--limit", type=int, default=10, help="prompts per set and trial (default: 10)")
    parser.add_argument("--zoo-dir", type=Path, default=REPO / "artifacts/zoo")
    parser.add_argument("--data", type=Path, default=REPO / "artifacts/data")
    args = parser.parse_args()

    started = time.perf_counter()
    name = "chaos"
    with tempfile.TemporaryDirectory(prefix="safemerge-chaos-") as scratch_name:
        scratch = Path(scratch_name)
        server = MlflowServer(scratch / "mlflow")
        server.start()
        storage = f"sqlite:///{scratch}/optuna.db"
        overrides = {
            "storage": storage,
            "mlflow.tracking_uri": server.url,
            "results_dir": str(scratch / "searches"),
            "zoo_dir": str(args.zoo_dir),
            "data": str(args.data),
            "evaluation.limit": args.limit,
            "lease_timeout_s": args.lease_timeout_s,
            "methods": "[task_arithmetic, ties]",
        }
        command = [SAFEMERGE, "search", "run", str(args.config), "--name", name, "--trials", str(args.trials)]
        command += ["--workers", str(args.workers)]
        for key, value in overrides.items():
            command += ["--set", f"{key}={value}"]
        state = {
            "last_worker_kill": 0,
            "worker_kills": 0,
            "mlflow_stopped_at": None,
            "mlflow_restarted": False,
            "driver_killed": False,
        }
        drivers: list[Driver] = []
        try:
            drivers.append(Driver(command, scratch, "driver 1"))
            run_with_faults(drivers[0], state, args, server)
            if state["driver_killed"]:
                time.sleep(args.lease_timeout_s + 2)  # the dead driver's lease goes stale
                resume = [SAFEMERGE, "search", "resume", name, "--results-dir", str(scratch / "searches")]
                drivers.append(Driver(resume, scratch, "driver 2"))
                run_with_faults(drivers[1], state, args, server)
            if not state["mlflow_restarted"]:
                server.start()
                state["mlflow_restarted"] = True
            exit_codes = []
            for driver in drivers:
                driver.process.wait(timeout=1800)
                driver.reader.join(timeout=30)
                exit_codes.append(driver.process.returncode)
            if exit_codes[-1] == 0:
                sync = subprocess.run(
                    [SAFEMERGE, "search", "sync", name, "--results-dir", str(scratch / "searches")],
                    capture_output=True,
                    text=True,
                    cwd=scratch,
                )
                exit_codes.append(sync.returncode)

            study = optuna.load_study(study_name=name, storage=storage)
            states = Counter(trial.state.name for trial in study.trials)
            client = MlflowClient(tracking_uri=server.url, registry_uri=server.url)
            experiment = client.get_experiment_by_name("safemerge")
            runs = client.search_runs(
                [experiment.experiment_id],
                filter_string=f"tags.`safemerge.search` = '{name}' and tags.`safemerge.role` = 'trial'",
                max_results=5000,
            )
            logged = Counter(int(run.data.tags["safemerge.trial"]) for run in runs)
            finished = {t.number for t in study.trials if t.state.name in ("COMPLETE", "FAIL")}
            faults = sum(int(t.user_attrs.get("metrics", {}).get("worker_faults", 0)) for t in study.trials)
        finally:
            server.stop()
            for driver in drivers:
                if driver.process.poll() is None:
                    driver.kill_group()
    result = {
        "benchmark": "chaos",
        "budget": args.trials,
        "completed": states.get("COMPLETE", 0),
        "failed": states.get("FAIL", 0),
        "lost": args.trials - states.get("COMPLETE", 0) - states.get("FAIL", 0),
        "duplicated": max(0, len(study.trials) - args.trials) + sum(count - 1 for count in logged.values()),
        "mlflow_runs": len(runs),
        "every_trial_in_mlflow": set(logged) == finished,
        "worker_kills": state["worker_kills"],
        "trials_rerun_after_a_worker_fault": faults,
        "mlflow_down_s": args.mlflow_down_s,
        "driver_killed": state["driver_killed"],
        "exit_codes": exit_codes,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(
        f"chaos: {result['completed']}/{args.trials} completed, {result['lost']} lost, {result['duplicated']} "
        f"duplicated, {result['failed']} failed, {result['mlflow_runs']} MLflow runs "
        f"({'all' if result['every_trial_in_mlflow'] else 'NOT all'} trials), {state['worker_kills']} worker kills, "
        f"driver killed: {state['driver_killed']}, {result['seconds']} s"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
