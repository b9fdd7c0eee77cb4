"""`safemerge cluster up | status | down`: a Ray head and an MLflow server on this machine, loopback by default.

`up` records what it started (pid and start time of each service's session leader) in a state file; `down`
stops exactly those sessions, so a Ray started by someone else on this machine is never touched. The Ray
head's environment names this project folder and the MLflow server, so `ray job submit ... -- python -m
safemerge.cluster.job` finds the zoo, the data and the tracking server without extra flags.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

from safemerge.cluster.jobs import ray_token
from safemerge.cluster.processes import (
    alive,
    http_ok,
    mlflow_server_command,
    port_in_use,
    start_service,
    stop_session,
    venv_tool,
    wait_until,
)
from safemerge.errors import UserError
from safemerge.files import write_json_atomic

STATE_FILE = "cluster.json"
# Read by safemerge.cluster.job inside every job the head runs (the job's working directory is an upload, not
# this folder).
HOME_ENV = "SAFEMERGE_HOME"


@dataclasses.dataclass(frozen=True)
class ClusterOptions:
    host: str = "127.0.0.1"
    ray_port: int = 6379
    dashboard_port: int = 8265
    mlflow_port: int = 5000
    agent_port: int = 52365  # the head's dashboard agent, which runs submitted jobs
    state_dir: Path = Path("artifacts/cluster")
    num_cpus: int | None = None
    num_gpus: int | None = None

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.host}:{self.dashboard_port}"

    @property
    def mlflow_url(self) -> str:
        return f"http://{self.host}:{self.mlflow_port}"


def _state_path(state_dir: Path) -> Path:
    return Path(state_dir) / STATE_FILE


def read_state(state_dir: Path) -> dict | None:
    path = _state_path(state_dir)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is not valid JSON ({error}); stop the services by hand and delete it") from None


def _write_state(state_dir: Path, state: dict) -> None:
    write_json_atomic(_state_path(state_dir), state)


def _record(process) -> dict:
    return {"pid": process.pid, "create_time": psutil.Process(process.pid).create_time()}


def ray_dashboard_ready(url: str) -> bool:
    """The job submission API answers, with this machine's Ray token when the cluster uses token authentication."""
    from safemerge.cluster.jobs import job_client

    try:
        job_client(url).get_version()
        return True
    except Exception:  # noqa: BLE001 - any failure means "not up yet"; the caller times out with the log
        return False


def ensure_ray_token() -> None:
    """Make sure this machine has a Ray token (~/.ray/auth_token, or where RAY_AUTH_TOKEN_PATH points), so the
    head always runs with token authentication: `ray start` turns it on only where a token already exists,
    which on a fresh machine depends on whether anything called `ray.init()` before. Ray's own
    `ray get-auth-token --generate` writes one when there is none; the token it prints is not kept."""
    if ray_token() is not None:  # the same lookup the clients use: nothing to generate, no subprocess
        return
    generated = subprocess.run([venv_tool("ray"), "get-auth-token", "--generate"], capture_output=True, text=True)
    if generated.returncode != 0:
        reason = (generated.stderr.strip().splitlines() or ["no message"])[-1]
        raise UserError(f"could not create a Ray authentication token ({reason}); run `ray get-auth-token --generate`")


def up(options: ClusterOptions, log=print) -> dict:
    """Start the Ray head and the MLflow server, wait until both answer, record them; returns the state."""
    state_dir = Path(options.state_dir).absolute()
    existing = read_state(state_dir)
    if existing and any(alive(s["pid"], s["create_time"]) for s in existing["services"].values()):
        raise UserError(f"a cluster recorded in {_state_path(state_dir)} is running; `safemerge cluster down` first")
    for what, port, option in (
        ("Ray GCS", options.ray_port, "--ray-port"),
        ("Ray dashboard", options.dashboard_port, "--dashboard-port"),
        ("Ray dashboard agent", options.agent_port, "--agent-port"),
        ("MLflow", options.mlflow_port, "--mlflow-port"),
    ):
        if port_in_use(options.host, port):
            raise UserError(f"{what} port {options.host}:{port} is in use; stop that service or pass {option}")
    state_dir.mkdir(parents=True, exist_ok=True)
    state = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "home": str(Path.cwd()),
        "ray_address": f"{options.host}:{options.ray_port}",
        "dashboard_url": options.dashboard_url,
        "mlflow_url": options.mlflow_url,
        "services": {},
    }
    mlflow_log = state_dir / "mlflow.log"
    mlflow = start_service(
        mlflow_server_command(
            options.host, options.mlflow_port, f"sqlite:///{state_dir}/mlflow.db", state_dir / "mlartifacts"
        ),
        mlflow_log,
    )
    state["services"]["mlflow"] = _record(mlflow)
    _write_state(state_dir, state)  # recorded before the wait, so `down` can stop a half-started cluster
    ray_command = [
        venv_tool("ray"),
        "start",
        "--head",
        "--block",
        "--disable-usage-stats",
        "--node-ip-address",
        options.host,
        "--port",
        str(options.ray_port),
        "--dashboard-host",
        options.host,
        "--dashboard-port",
        str(options.dashboard_port),
        "--include-dashboard",
        "true",
        "--dashboard-agent-listen-port",
        str(options.agent_port),
    ]
    if options.num_cpus is not None:
        ray_command += ["--num-cpus", str(options.num_cpus)]
    if options.num_gpus is not None:
        ray_command += ["--num-gpus", str(options.num_gpus)]
    ray_log = state_dir / "ray.log"
    ensure_ray_token()
    # Jobs inherit the head's environment: this project folder, the tracking server, and this venv's python.
    job_env = {
        "RAY_AUTH_MODE": "token",
        HOME_ENV: str(Path.cwd()),
        "MLFLOW_TRACKING_URI": options.mlflow_url,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    ray_head = start_service(ray_command, ray_log, env=job_env)
    state["services"]["ray"] = _record(ray_head)
    _write_state(state_dir, state)
    try:
        wait_until(lambda: http_ok(f"{options.mlflow_url}/health"), "the MLflow server", mlflow, mlflow_log)
        log(f"MLflow server: {options.mlflow_url} (store {state_dir}/mlflow.db)")
        # The job API answers before the head's job agent has registered; a job submitted then fails with
        # "No available agent", so wait for the agent too.
        agent_health = f"http://{options.host}:{options.agent_port}/api/local_raylet_healthz"
        wait_until(
            lambda: ray_dashboard_ready(options.dashboard_url) and http_ok(agent_health),
            "the Ray head",
            ray_head,
            ray_log,
        )
        log(f"Ray head: {state['ray_address']}, dashboard and job submission at {options.dashboard_url}")
    except BaseException:
        down(state_dir, log=lambda _: None)
        raise
    return state


def status(state_dir: Path) -> dict:
    """Each recorded service: whether its process runs and whether its endpoint answers."""
    state = read_state(Path(state_dir).absolute())
    if state is None:
        return {"running": False, "services": {}}
    checks = {
        "ray": lambda: ray_dashboard_ready(state["dashboard_url"]),
        "mlflow": lambda: http_ok(f"{state['mlflow_url']}/health"),
    }
    report = {}
    for name, record in state["services"].items():
        running = alive(record["pid"], record["create_time"])
        report[name] = {"pid": record["pid"], "running": running, "answers": running and checks[name]()}
    return {**state, "running": all(s["answers"] for s in report.values()), "services": report}


def down(state_dir: Path, log=print) -> int:
    """Stop every recorded service session; returns how many processes were stopped."""
    state_dir = Path(state_dir).absolute()
    state = read_state(state_dir)
    if state is None:
        log(f"no cluster recorded in {state_dir}; nothing to stop")
        return 0
    stopped = 0
    for name in ("ray", "mlflow"):  # Ray first: its jobs may still write to MLflow
        record = state["services"].get(name)
        if record:
            count = stop_session(record["pid"], record["create_time"])
            stopped += count
            log(f"stopped {name} ({count} processes)")
    _forget_current_cluster(state["ray_address"])
    _state_path(state_dir).unlink()
    return stopped


def _forget_current_cluster(ray_address: str) -> None:
    """Remove Ray's pointer to the latest head when it names ours (what `ray stop` does), so no later
    `ray.init()` tries to reach the stopped head."""
    pointer = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "ray_current_cluster"
    port = ray_address.rpartition(":")[2]
    try:
        if pointer.read_text().strip().rpartition(":")[2] == port:
            pointer.unlink()
    except OSError:
        pass


def format_status(report: dict) -> str:
    if not report["services"]:
        return "no cluster is recorded; start one with `safemerge cluster up`"
    lines = [f"cluster started {report['started']} from {report['home']}"]
    urls = {"ray": report["dashboard_url"], "mlflow": report["mlflow_url"]}
    for name, service in report["services"].items():
        condition = "answers" if service["answers"] else ("runs, not answering" if service["running"] else "stopped")
        lines.append(f"  {name:7s} pid {service['pid']:>7}  {condition:20s} {urls[name]}")
    return "\n".join(lines)
