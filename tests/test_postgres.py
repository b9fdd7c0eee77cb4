"""A search across two Ray nodes with a real PostgreSQL as its Optuna storage, as the README's multi-node setup has
it: Debian's `postgresql` on 127.0.0.1 in a temporary folder, a Ray head and a second node joined with `ray start
--address` on this machine, one worker on each; the budget ends COMPLETE in the database, and `search resume`
raises it to exactly the new budget."""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import optuna
import psutil
import pytest
from sqlalchemy.engine import make_url

from safemerge.cluster.local import ensure_ray_token
from safemerge.cluster.processes import free_port, free_ports, start_service, stop_session, venv_tool, wait_until
from tests.conftest import report_figure
from tests.test_search import REPO, SAFEMERGE, search_overrides

POSTGRES_PROGRAMS = ("initdb", "pg_ctl", "postgres")
# Server users tried, in order, when the tests run as root (as CI does): initdb and postgres refuse root.
SERVER_USERS = ("postgres", "nobody")
BUDGET, RAISED_BUDGET = 4, 6
# The nodes run with Ray's token authentication, as `safemerge cluster up` starts a head; every client of theirs
# (the probes, the search drivers) says so too, as the README has users `export RAY_AUTH_MODE=token`.
RAY_AUTH = {"RAY_AUTH_MODE": "token"}


def postgres_bin_dir() -> Path | None:
    """The folder of PostgreSQL's server programs: PATH's pg_ctl (its real folder, where pg_ctl finds postgres),
    else Debian's /usr/lib/postgresql/N/bin, newest first (Debian's /usr/bin holds only the cluster wrappers)."""
    candidates = []
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)

    def version(folder: Path) -> float:
        try:
            return float(folder.parent.name)
        except ValueError:
            return 0.0

    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    for folder in candidates:
        if all(os.access(folder / program, os.X_OK) for program in POSTGRES_PROGRAMS):
            return folder
    return None


def server_user() -> str | None:
    """Who runs the server: nobody else when not root; as root, Debian's `postgres` user or `nobody`."""
    if os.geteuid() != 0:
        return None
    for name in SERVER_USERS:
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    pytest.fail(f"running as root and none of the users {SERVER_USERS} exists to run PostgreSQL as")


def as_server_user(command: list[str], user: str | None) -> list[str]:
    return ["runuser", "-u", user, "--", *command] if user else command


def run_checked(command: list[str], cwd: Path, timeout: float = 120) -> None:
    result = subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=timeout)
    assert result.returncode == 0, f"{command[:6]} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A PostgreSQL server on a free loopback port with a database `optuna` (password login), stopped at the end.

    Its folder is made with tempfile under /tmp rather than in tmp_path: as root, pytest's folders are private
    to root, and the server runs as another user."""
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        pytest.skip(
            "no PostgreSQL server found (initdb, pg_ctl, postgres on PATH or in /usr/lib/postgresql/*/bin); "
            "install Debian's `postgresql` (`.ci/run` does)"
        )
    import psycopg  # the `postgres` extra, which scripts/setup.sh installs

    user = server_user()
    root = Path(tempfile.mkdtemp(prefix="safemerge-pg-"))
    data, password = root / "data", secrets.token_hex(8)
    (root / "password").write_text(password + "\n")
    if user:
        entry = pwd.getpwnam(user)
        for path in (root, root / "password"):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    port = free_port()
    pg_ctl = str(bin_dir / "pg_ctl")
    try:
        run_checked(
            as_server_user(
                [
                    str(bin_dir / "initdb"),
                    "--pgdata",
                    str(data),
                    "--username",
                    "optuna",
                    f"--pwfile={root / 'password'}",
                    "--auth=scram-sha-256",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-sync",
                ],
                user,
            ),
            cwd=root,
        )
        # TCP on loopback only, its socket file in its own folder (not /var/run/postgresql), no fsync: a test store.
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off"
        run_checked(
            as_server_user(
                [
                    pg_ctl,
                    "--pgdata",
                    str(data),
                    "--log",
                    str(root / "server.log"),
                    "--wait",
                    "--options",
                    options,
                    "start",
                ],
                user,
            ),
            cwd=root,
        )
        with psycopg.connect(f"postgresql://optuna:{password}@127.0.0.1:{port}/postgres", autocommit=True) as db:
            db.execute("CREATE DATABASE optuna")
        # The form the README documents: SQLAlchemy 2.1 reads postgresql:// with psycopg 3.
        yield f"postgresql://optuna:{password}@127.0.0.1:{port}/optuna"
    finally:
        if (data / "postmaster.pid").exists():  # a server runs, even one whose start timed out
            run_checked(as_server_user([pg_ctl, "--pgdata", str(data), "--mode", "fast", "--wait", "stop"], user), root)
        shutil.rmtree(root, ignore_errors=True)


def holds(path: Path, secret: str) -> bool:
    """Whether the file's bytes contain `secret` (as written, or percent-encoded as a URL holds it)."""
    try:
        data = path.read_bytes()
    except OSError:  # a socket or a file removed meanwhile
        return False
    return secret.encode() in data or quote(secret).encode() in data


def ray_node_command(
    temp_dir: Path, resources: str | None = None, head_port: int | None = None, address: str | None = None
) -> list[str]:
    """`ray start --block` for a head (head_port) or a node joining `address`, on 127.0.0.1 with 2 logical CPUs.
    Every port it would otherwise take by default (10001, 52365, ...) is a free one, so nodes of other sessions on
    this machine, or the other node here, never collide with it."""
    command = [venv_tool("ray"), "start", "--block", "--disable-usage-stats", "--node-ip-address", "127.0.0.1"]
    if head_port is not None:
        command += [
            "--head",
            "--port",
            str(head_port),
            "--include-dashboard",
            "false",
            "--ray-client-server-port",
            str(free_port()),
        ]
    else:
        command += ["--address", address]
    options = (
        "--node-manager-port",
        "--object-manager-port",
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port",
        "--metrics-export-port",
    )
    for option, port in zip(options, free_ports(len(options)), strict=True):
        command += [option, str(port)]
    command += [
        "--num-cpus",
        "2",
        "--num-gpus",
        "0",
        "--object-store-memory",
        str(256 * 2**20),
        "--temp-dir",
        str(temp_dir),
    ]
    if resources:
        command += ["--resources", resources]
    return command


def alive_nodes(address: str) -> int:
    """How many nodes the cluster at `address` has alive, asked by a driver of its own (never this process's Ray)."""
    probe = "import ray; ray.init(address=%r, log_to_driver=False); print(sum(n['Alive'] for n in ray.nodes()))"
    result = subprocess.run(
        [sys.executable, "-c", probe % address],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **RAY_AUTH},
    )
    return int(result.stdout.split()[-1]) if result.returncode == 0 and result.stdout.split() else 0


@pytest.fixture
def two_ray_nodes(tmp_path) -> Iterator[dict]:
    """A Ray head and a second node (custom resource `second_node`), each `ray start --block` in a session of its
    own, which is what is stopped at the end: never `ray stop`, which ends every Ray on the machine. Their temp
    folders are short (Ray's socket paths must fit 107 bytes) and removed with them."""
    ensure_ray_token()  # what `cluster up` does: a fresh machine has no token for the nodes and clients to share
    temp_root = Path(tempfile.mkdtemp(prefix="sm-ray-"))
    port = free_port()
    address = f"127.0.0.1:{port}"
    nodes: dict[str, subprocess.Popen] = {}
    try:
        nodes["head"] = start_service(
            ray_node_command(temp_root / "head", head_port=port), tmp_path / "ray-head.log", RAY_AUTH
        )
        # The head's GCS must answer before a node can join it.
        wait_until(lambda: alive_nodes(address) >= 1, "the Ray head", nodes["head"], tmp_path / "ray-head.log")
        nodes["second"] = start_service(
            ray_node_command(temp_root / "second", resources='{"second_node": 1}', address=address),
            tmp_path / "ray-second.log",
            RAY_AUTH,
        )
        wait_until(
            lambda: alive_nodes(address) >= 2, "the second Ray node", nodes["second"], tmp_path / "ray-second.log"
        )
        yield {"address": address, "pids": {name: node.pid for name, node in nodes.items()}, "temp_root": temp_root}
    finally:
        for name in ("second", "head"):
            if name in nodes:
                stop_session(nodes[name].pid)
        shutil.rmtree(temp_root, ignore_errors=True)


def node_of(process: psutil.Process, node_pids: dict[str, int]) -> str | None:
    """The node (of `node_pids`, each node's `ray start` pid) whose raylet started `process`, if any."""
    try:
        ancestors = {parent.pid for parent in process.parents()}
        session = os.getsid(process.pid)
    except (psutil.Error, OSError):
        return None
    return next((name for name, pid in node_pids.items() if pid in ancestors or pid == session), None)


def worker_nodes(node_pids: dict[str, int]) -> set[str]:
    """The nodes that run a trial worker actor now (Ray titles its process `ray::TrialWorker...`)."""
    found = set()
    for process in psutil.process_iter():
        try:
            if not any("ray::TrialWorker" in part for part in process.cmdline()):
                continue
        except psutil.Error:
            continue
        node = node_of(process, node_pids)
        if node:
            found.add(node)
    return found


def run_on_cluster(
    command: list[str], cluster: dict, cwd: Path, log: Path, env: dict[str, str] | None = None, timeout: float = 600
) -> tuple[int, str, set]:
    """Run a search command as a driver of the cluster (RAY_ADDRESS, and `env`); returns its exit code, its output
    and the nodes seen running its workers while it ran."""
    seen: set[str] = set()
    with open(log, "w") as out:
        driver = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            start_new_session=True,
            env={**os.environ, "RAY_ADDRESS": cluster["address"], **RAY_AUTH, **(env or {})},
        )
        deadline = time.monotonic() + timeout
        try:
            while driver.poll() is None and time.monotonic() < deadline:
                seen |= worker_nodes(cluster["pids"])
                time.sleep(1)
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    return driver.returncode, log.read_text(), seen


@pytest.mark.vllm
def test_a_two_node_search_on_postgresql_completes_its_budget_and_resumes(
    tmp_path, postgres_url, two_ray_nodes, zoo_dir, data_dir
):
    name = "two-nodes"
    args = search_overrides(tmp_path, name, BUDGET, f"sqlite:///{tmp_path}/mlflow.db", zoo_dir, data_dir)
    # Each node has 2 logical CPUs and a worker takes 1.5: one worker fits a node, so the two workers must land on
    # the two nodes, with room left on each for Tune's trial coordinators (0.01 CPU each).
    args += ["--set", f"storage={postgres_url}", "--set", "workers.count=2", "--set", "workers.cpus=1.5"]
    started = time.monotonic()
    code, output, nodes = run_on_cluster(
        [SAFEMERGE, "search", "run", str(REPO / "configs/zoo.yaml"), *args],
        two_ray_nodes,
        tmp_path,
        tmp_path / "run.log",
    )
    assert code == 0, output[-3000:]
    assert f"[{BUDGET}/{BUDGET}]" in output, output[-3000:]
    assert nodes == {"head", "second"}, (nodes, output[-2000:])
    study = optuna.load_study(study_name=name, storage=postgres_url)
    assert [trial.state for trial in study.trials] == [optuna.trial.TrialState.COMPLETE] * BUDGET
    assert {trial.user_attrs["metrics"]["worker"] for trial in study.trials} == {0.0, 1.0}
    first_run_s = time.monotonic() - started
    # The password stays in the driver that parsed it: config.yaml, which resume reads, holds the URL without it,
    # and resume takes it from SAFEMERGE_STORAGE_PASSWORD (search/secrets.py).
    password = make_url(postgres_url).password
    assert password not in (tmp_path / "searches" / name / "config.yaml").read_text()

    code, output, nodes = run_on_cluster(
        [
            SAFEMERGE,
            "search",
            "resume",
            name,
            "--trials",
            str(RAISED_BUDGET),
            "--results-dir",
            str(tmp_path / "searches"),
        ],
        two_ray_nodes,
        tmp_path,
        tmp_path / "resume.log",
        env={"SAFEMERGE_STORAGE_PASSWORD": password},
    )
    assert code == 0, output[-3000:]
    assert f"resuming {name}: {BUDGET} trials finished" in output, output[-3000:]
    assert f"[{RAISED_BUDGET}/{RAISED_BUDGET}]" in output, output[-3000:]
    assert nodes == {"head", "second"}, (nodes, output[-2000:])
    study = optuna.load_study(study_name=name, storage=postgres_url)
    assert [trial.state for trial in study.trials] == [optuna.trial.TrialState.COMPLETE] * RAISED_BUDGET
    assert len({tuple(sorted(trial.params.items())) for trial in study.trials}) == RAISED_BUDGET  # none ran twice
    # Nor is it in any file the search, MLflow (store, params, config.json, artifacts, registered models) or Ray
    # (Tune's pickles, both nodes' session logs, the drivers' logs) wrote, nor in either driver's console.
    roots = (tmp_path, two_ray_nodes["temp_root"])
    leaked = [str(path) for root in roots for path in root.rglob("*") if path.is_file() and holds(path, password)]
    assert not leaked, leaked
    assert password not in (tmp_path / "run.log").read_text() + output
    report_figure(
        f"two-node search on PostgreSQL: {first_run_s:.0f} s, resume {time.monotonic() - started - first_run_s:.0f} s"
    )
