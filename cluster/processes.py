"""Start, probe and stop the local services safemerge runs beside (a Ray head, an MLflow server).

Each service starts in a session of its own, so stopping it reaches every process it spawned (Ray's GCS,
raylet, dashboard and workers; MLflow's uvicorn workers) and nothing else on the machine.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import psutil

from safemerge.errors import UserError


def venv_tool(name: str) -> str:
    """The console script `name` of this interpreter's environment (works without an activated venv)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex((host, port)) == 0


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct free ports: every probe stays bound until all are chosen, as separate probes may be given
    the same port (measured: a Ray dashboard and an MLflow server handed one port by two `free_port` calls)."""
    with contextlib.ExitStack() as probes:
        ports = []
        for _ in range(count):
            probe = probes.enter_context(socket.socket())
            probe.bind((host, 0))
            ports.append(probe.getsockname()[1])
        return ports


def http_ok(url: str, timeout: float = 2.0, headers: Mapping[str, str] | None = None) -> bool:
    try:
        request = urllib.request.Request(url, headers=dict(headers or {}))
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return 200 <= response.status < 300
    except (OSError, urllib.error.URLError, ValueError):
        return False


def start_service(command: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None) -> subprocess.Popen:
    """Start `command` in its own session with stdout and stderr in `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            list(command),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )


def wait_until(
    ready: Callable[[], bool], what: str, process: subprocess.Popen | None, log_path: Path, timeout: float = 120.0
) -> None:
    """Poll `ready` until it holds; fail with the log's tail if the process exits or the time runs out."""
    deadline = time.monotonic() + timeout
    while not ready():
        exited = process is not None and process.poll() is not None
        if exited or time.monotonic() > deadline:
            tail = log_path.read_text(errors="replace")[-2000:] if log_path.is_file() else ""
            reason = f"exited with code {process.returncode}" if exited else f"did not answer within {timeout:.0f} s"
            raise UserError(f"{what} {reason}; its log {log_path} ends with:\n{tail}")
        time.sleep(0.5)


def mlflow_server_command(host: str, port: int, backend_store_uri: str, artifacts_dir: Path) -> list[str]:
    """`mlflow server` with a sqlite (or any SQL) store and proxied local artifacts, one worker."""
    return [
        venv_tool("mlflow"),
        "server",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        backend_store_uri,
        "--artifacts-destination",
        str(artifacts_dir),
        # Bound to loopback, it answers loopback names only (MLflow's default also takes private IPs): a web page
        # that rebinds its own name to 127.0.0.1 cannot reach it.
        *(["--allowed-hosts", LOOPBACK_HOSTS] if is_loopback(host) else []),
    ]


LOOPBACK_HOSTS = "localhost,localhost:*,127.0.0.1,127.0.0.1:*,[::1],[::1]:*"


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _session_members(root_pid: int) -> list[psutil.Process]:
    """The root process, its descendants, and every process left in its session (orphans reparented to init)."""
    members: dict[int, psutil.Process] = {}
    try:
        root = psutil.Process(root_pid)
        members[root.pid] = root
        members.update({child.pid: child for child in root.children(recursive=True)})
    except psutil.NoSuchProcess:
        pass
    for process in psutil.process_iter():
        try:
            if process.pid not in members and os.getsid(process.pid) == root_pid:
                members[process.pid] = process
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return list(members.values())


def alive(pid: int | None, create_time: float | None = None) -> bool:
    """Whether `pid` runs and (when given) is the same process that started at `create_time`."""
    if not pid:
        return False
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return create_time is None or abs(process.create_time() - create_time) < 1.0
    except psutil.Error:
        return False


def stop_session(root_pid: int, create_time: float | None = None, grace_seconds: float = 15.0) -> int:
    """Terminate a service started by `start_service`: SIGTERM to its whole session, SIGKILL what is left.

    Returns how many processes were stopped. A pid reused by an unrelated process (different start time) is
    left alone."""
    if not alive(root_pid, create_time):
        members = [p for p in _session_members(root_pid) if p.pid != root_pid]
    else:
        members = _session_members(root_pid)
    for process in members:
        try:
            process.terminate()
        except psutil.Error:
            pass
    _, still_running = psutil.wait_procs(members, timeout=grace_seconds)
    for process in still_running:
        try:
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(still_running, timeout=5)
    return len(members)


class MlflowServer:
    """A real `mlflow server` on one loopback port with its store (sqlite) and artifacts under `root`, started and
    stopped at will on the same port and store: what the tests and the chaos benchmark stop and bring back."""

    def __init__(self, root: Path, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.root, self.host = Path(root), host
        self.port = port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> str:
        log = self.root / "server.log"
        command = mlflow_server_command(self.host, self.port, f"sqlite:///{self.root}/mlflow.db", self.root / "art")
        self.process = start_service(command, log)
        wait_until(lambda: http_ok(f"{self.url}/health"), "mlflow server", self.process, log)
        return self.url

    def stop(self) -> None:
        if self.process is not None:
            stop_session(self.process.pid)
            self.process = None
