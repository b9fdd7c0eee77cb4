"""The cluster room against real services: `safemerge cluster up/down` (a real Ray head and MLflow server on
loopback), a search submitted with the `ray job submit` CLI, and the nightly watcher submitting through Ray's
job SDK. Ray's token authentication stays on, as recent Ray releases start it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import psutil
import pytest
import yaml
from safetensors.torch import load_file, save_file

from safemerge.cluster.jobs import job_client
from safemerge.cluster.processes import free_port, free_ports, port_in_use
from tests.conftest import REPO

BIN = Path(sys.executable).parent
SAFEMERGE = str(BIN / "safemerge")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def run(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        list(args), capture_output=True, text=True, timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})}
    )


def cluster_ports() -> dict[str, int]:
    return dict(zip(("ray", "dashboard", "mlflow", "agent"), free_ports(4), strict=True))


def cluster_up(state_dir: Path, ports: dict[str, int]) -> subprocess.CompletedProcess:
    return run(
        SAFEMERGE,
        "cluster",
        "up",
        "--state-dir",
        str(state_dir),
        "--ray-port",
        str(ports["ray"]),
        "--dashboard-port",
        str(ports["dashboard"]),
        "--mlflow-port",
        str(ports["mlflow"]),
        "--agent-port",
        str(ports["agent"]),
        "--num-cpus",
        "2",
    )


def session_processes(state_dir: Path) -> list[int]:
    """Every live process in the sessions `cluster up` recorded."""
    state = json.loads((state_dir / "cluster.json").read_text())
    leaders = {service["pid"] for service in state["services"].values()}
    found = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) in leaders:
                found.append(process.pid)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return found


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, zoo_dir, data_dir):
    """A running `safemerge cluster up` for the module; `down` at the end."""
    state_dir = tmp_path_factory.mktemp("cluster")
    ports = cluster_ports()
    started = cluster_up(state_dir, ports)
    assert started.returncode == 0, started.stderr
    yield {
        "state_dir": state_dir,
        "dashboard": f"http://127.0.0.1:{ports['dashboard']}",
        "mlflow": f"http://127.0.0.1:{ports['mlflow']}",
    }
    run(SAFEMERGE, "cluster", "down", "--state-dir", str(state_dir))


def wait_for(client, submission_id: str, timeout: float = 600) -> str:
    deadline = time.monotonic() + timeout
    while (status := str(client.get_job_status(submission_id).value)) not in TERMINAL:
        assert time.monotonic() < deadline, f"job {submission_id} still {status} after {timeout} s"
        time.sleep(2)
    return status


def small_search(tmp_path: Path, zoo_dir: Path, data_dir: Path, name: str) -> dict[str, str]:
    """Config fields for a two-trial search on 8 prompts a set, its stores under tmp_path."""
    return {
        "name": name,
        "trials": "2",
        "zoo_dir": str(zoo_dir),
        "data": str(data_dir),
        "storage": f"sqlite:///{tmp_path}/optuna.db",
        "results_dir": str(tmp_path / "searches"),
        "evaluation.limit": "8",
        "methods": "[task_arithmetic]",
    }


@pytest.mark.vllm
def mlflow_answers(port: int, host: str) -> int:
    """The HTTP status of an MLflow API call sent to 127.0.0.1:port with the Host header `host:port`."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=1", headers={"Host": f"{host}:{port}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_cluster_up_status_down_leaves_nothing_running(tmp_path):
    ports = cluster_ports()
    started = cluster_up(tmp_path, ports)
    assert started.returncode == 0, started.stderr
    status = run(SAFEMERGE, "cluster", "status", "--state-dir", str(tmp_path), "--json")
    report = json.loads(status.stdout)
    assert status.returncode == 0 and report["running"]
    assert {name for name, s in report["services"].items() if s["answers"]} == {"ray", "mlflow"}
    assert all(port_in_use("127.0.0.1", port) for port in (ports["dashboard"], ports["mlflow"]))
    assert len(session_processes(tmp_path)) >= 4  # gcs, raylet, dashboard, mlflow's server and worker
    state = json.loads((tmp_path / "cluster.json").read_text())
    # The MLflow server answers loopback names only: not a private IP, nor a rebound public name.
    assert {host: mlflow_answers(ports["mlflow"], host) for host in ("localhost", "10.1.2.3", "evil.example")} == {
        "localhost": 200,
        "10.1.2.3": 403,
        "evil.example": 403,
    }

    # A second `up` on the same state refuses instead of starting a second head.
    again = cluster_up(tmp_path, ports)
    assert again.returncode == 2 and "cluster down" in again.stderr

    stopped = run(SAFEMERGE, "cluster", "down", "--state-dir", str(tmp_path))
    assert stopped.returncode == 0, stopped.stderr
    leaders = {service["pid"] for service in state["services"].values()}
    leftovers = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) in leaders:
                leftovers.append(process.cmdline())
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    assert leftovers == []
    assert not any(port_in_use("127.0.0.1", port) for port in ports.values())
    assert not (tmp_path / "cluster.json").exists()


@pytest.mark.vllm
def test_ray_job_submit_cli_runs_a_search_that_lands_in_mlflow(cluster, tmp_path, zoo_dir, data_dir):
    fields = small_search(tmp_path, zoo_dir, data_dir, "job-cli")
    args = ["--config", "configs/zoo.yaml"]
    for key, value in fields.items():
        args += ["--set", f"{key}={value}"]
    submitted = run(
        str(BIN / "ray"),
        "job",
        "submit",
        "--address",
        cluster["dashboard"],
        "--working-dir",
        ".",
        "--submission-id",
        "job-cli-test",
        "--no-wait",
        "--",
        "python",
        "-m",
        "safemerge.cluster.job",
        *args,
        env={"RAY_AUTH_MODE": "token"},
    )
    assert submitted.returncode == 0, submitted.stderr
    client = job_client(cluster["dashboard"])
    status = wait_for(client, "job-cli-test")
    logs = client.get_job_logs("job-cli-test")
    assert status == "SUCCEEDED", logs[-3000:]
    assert f"cluster.job: MLflow run {cluster['mlflow']}/#/experiments/" in logs

    # The upload is the code: kilobytes, without the venv, the zoo or any store.
    package = Path(client.get_job_info("job-cli-test").runtime_env["working_dir"])
    assert package.name.startswith("_ray_pkg_")
    # Under the head's own session folder (not session_latest: another Ray on the machine may have started since).
    uploads = sorted(Path("/tmp/ray").glob(f"session_*/runtime_resources/working_dir_files/{package.stem}*"))
    unpacked = next(path for path in uploads if path.is_dir())
    size = sum(path.stat().st_size for path in unpacked.rglob("*") if path.is_file())
    assert size < 2_000_000
    names = {path.relative_to(unpacked).parts[0] for path in unpacked.rglob("*")}
    assert {"cluster", "search", "configs"} <= names and not names & {".venv", "artifacts", "mlruns"}

    # The job took the MLflow server from the head's environment: parent and trials are there.
    client_ml = mlflow.MlflowClient(tracking_uri=cluster["mlflow"], registry_uri=cluster["mlflow"])
    experiment = client_ml.get_experiment_by_name("safemerge")
    runs = client_ml.search_runs([experiment.experiment_id], filter_string="tags.mlflow.runName = 'job-cli'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    children = client_ml.search_runs(
        [experiment.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{runs[0].info.run_id}'"
    )
    assert len(children) == 2


@pytest.mark.vllm
def test_job_exits_non_zero_when_the_search_cannot_run(cluster):
    client = job_client(cluster["dashboard"])
    job = client.submit_job(
        entrypoint="python -m safemerge.cluster.job --config configs/zoo.yaml --trials 0",
        runtime_env={"working_dir": str(REPO), "excludes": [".venv/", "artifacts/", ".git/"]},
    )
    assert wait_for(client, job) == "FAILED"
    assert "cluster.job: error: config configs/zoo.yaml: trials:" in client.get_job_logs(job)


def release_of(zoo_dir: Path, out: Path, nudge: float = 0.0) -> Path:
    """A copy of the zoo's medical expert as a release folder; `nudge` changes one weight (a new release)."""
    shutil.copytree(zoo_dir / "medical", out)
    if nudge:
        tensors = load_file(out / "model.safetensors")
        name = "model.norm.weight"
        tensors[name] = tensors[name] + nudge
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.mark.vllm
def test_nightly_submits_each_release_once(cluster, tmp_path, zoo_dir, data_dir):
    template = yaml.safe_load((REPO / "configs" / "zoo.yaml").read_text())
    for dotted, value in small_search(tmp_path, zoo_dir, data_dir, "nightly").items():
        target = template
        *parents, leaf = dotted.split(".")
        for key in parents:
            target = target[key]
        target[leaf] = yaml.safe_load(value)
    template["mlflow"]["tracking_uri"] = cluster["mlflow"]
    template_path = tmp_path / "template.yaml"
    template_path.write_text(yaml.safe_dump(template))
    releases = tmp_path / "releases"
    releases.mkdir()
    state = tmp_path / "state.json"
    nightly = [
        SAFEMERGE,
        "nightly",
        "--releases",
        str(releases),
        "--config",
        str(template_path),
        "--address",
        cluster["dashboard"],
        "--state",
        str(state),
        "--settle-s",
        "0",
    ]
    client = job_client(cluster["dashboard"])

    def our_jobs() -> list:
        return [job for job in client.list_jobs() if (job.metadata or {}).get("safemerge_release")]

    release_of(zoo_dir, releases / "medical-2026-11-01")
    first = run(*nightly, "--wait")
    assert first.returncode == 0, first.stderr
    jobs = our_jobs()
    assert len(jobs) == 1 and str(jobs[0].status.value) == "SUCCEEDED"
    recorded = json.loads(state.read_text())["releases"]
    assert [r["status"] for r in recorded.values()] == ["submitted"]
    assert [r["submission_id"] for r in recorded.values()] == [jobs[0].submission_id]

    before = state.read_bytes()
    second = run(*nightly)
    assert second.returncode == 0 and "nothing new" in second.stdout
    assert len(our_jobs()) == 1 and state.read_bytes() == before

    # Two watchers at once on a new release: one job.
    release_of(zoo_dir, releases / "medical-2026-11-02", nudge=1e-3)
    watchers = [subprocess.Popen(nightly, cwd=REPO, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [watcher.communicate(timeout=300)[0] for watcher in watchers]
    assert [watcher.returncode for watcher in watchers] == [0, 0]
    assert sum("submitted job" in output for output in outputs) == 1
    jobs = our_jobs()
    assert len(jobs) == 2
    new_job = next(job for job in jobs if job.metadata["safemerge_release"] == "medical-2026-11-02")
    client.stop_job(new_job.submission_id)  # its search is the same as the first one's; spare the CPUs
    wait_for(client, new_job.submission_id)

    # A crash between recording and submitting: the next watcher submits it (once), a later one not again.
    release_of(zoo_dir, releases / "medical-2026-11-03", nudge=2e-3)
    crashed = json.loads(state.read_text())
    from safemerge.cluster.nightly import content_hash

    release_id = content_hash(releases / "medical-2026-11-03", {})
    crashed["releases"][release_id] = {
        "name": "medical-2026-11-03",
        "reference": str(releases / "medical-2026-11-03"),
        "submission_id": f"safemerge-{release_id[:24]}",
        "search": "x",
        "status": "submitting",
        "recorded_at": "",
    }
    state.write_text(json.dumps(crashed))
    repaired = run(*nightly)
    assert repaired.returncode == 0 and "submitted job" in repaired.stdout
    assert run(*nightly).stdout.count("submitted job") == 0
    assert len(our_jobs()) == 3
    client.stop_job(f"safemerge-{release_id[:24]}")


@pytest.mark.vllm
def test_nightly_bad_input_is_one_clear_error_and_leaves_the_state(cluster, tmp_path, zoo_dir):
    releases = tmp_path / "releases"
    release_of(zoo_dir, releases / "medical-ok")
    state = tmp_path / "state.json"
    state.write_text('{"releases": {}, "hash_cache": {}}\n')
    before = state.read_bytes()
    template = tmp_path / "template.yaml"
    config = yaml.safe_load((REPO / "configs" / "zoo.yaml").read_text())
    config["mlflow"]["tracking_uri"] = cluster["mlflow"]
    template.write_text(yaml.safe_dump(config))
    bad_template = tmp_path / "bad.yaml"
    bad_template.write_text(yaml.safe_dump({**config, "trials": 0}))
    (releases / "not-a-model").mkdir()

    def nightly(*, config=template, address=cluster["dashboard"], extra=()):
        return run(
            SAFEMERGE,
            "nightly",
            "--releases",
            str(releases),
            "--config",
            str(config),
            "--address",
            address,
            "--state",
            str(state),
            "--settle-s",
            "0",
            *extra,
        )

    cases = {
        "not a model folder": nightly(),
        "trials": nightly(config=bad_template),
        "no Ray job server answers": nightly(address=f"http://127.0.0.1:{free_port()}"),
        "does not answer": nightly(extra=("--mlflow-uri", f"http://127.0.0.1:{free_port()}")),
    }
    for fragment, result in cases.items():
        assert result.returncode == 2, (fragment, result.stderr)
        assert fragment in result.stderr and result.stderr.count("\n") == 1, result.stderr
        assert state.read_bytes() == before


def test_kuberay_manifests_share_one_image_and_one_entrypoint():
    import shlex

    from safemerge.cluster.job import build_parser
    from safemerge.search.config import load_config

    manifests = {path.name: yaml.safe_load(path.read_text()) for path in (REPO / "cluster" / "k8s").glob("*.yaml")}
    kinds = {name: manifest["kind"] for name, manifest in manifests.items()}
    assert sorted(kinds.values()) == ["CronJob", "CronJob", "RayCluster", "RayCronJob", "RayJob"]

    def values(node, key):
        if isinstance(node, dict):
            for k, v in node.items():
                yield from [v] if k == key else values(v, key)
        elif isinstance(node, list):
            for item in node:
                yield from values(item, key)

    images = {image for manifest in manifests.values() for image in values(manifest, "image")}
    assert len(images) == 1

    def by_kind(kind):
        return [m for m in manifests.values() if m["kind"] == kind]

    submit = next(c for m in by_kind("CronJob") for c in values(m, "command") if c[:3] == ["ray", "job", "submit"])
    scheduled = [
        by_kind("RayCronJob")[0]["spec"]["jobTemplate"]["entrypoint"],
        shlex.join(submit[submit.index("--") + 1 :]),
    ]
    # A scheduled search is named by its models' releases: each night's new release is a search of its own.
    assert (
        len(set(scheduled)) == 1 and scheduled[0] == by_kind("RayJob")[0]["spec"]["entrypoint"] + " --name-by-release"
    )
    argv = shlex.split(scheduled[0])
    assert argv[:3] == ["python", "-m", "safemerge.cluster.job"]
    args = build_parser().parse_args(argv[3:])
    assert args.name_by_release
    config = load_config(REPO / args.config)
    assert config.workers.count == "auto" and config.workers.gpus == 1
    assert config.storage.startswith("postgresql://") and config.mlflow.tracking_uri.startswith("http")
    for cron in by_kind("RayCronJob") + by_kind("CronJob"):
        assert len(cron["spec"]["schedule"].split()) == 5


def test_job_and_cluster_bad_input_is_one_line(tmp_path):
    import socket

    job = run(sys.executable, "-m", "safemerge.cluster.job", "--config", str(tmp_path / "missing.yaml"))
    assert job.returncode == 2 and job.stderr.count("\n") == 1
    assert "cluster.job: error: config" in job.stderr and "does not exist" in job.stderr

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = {**cluster_ports(), "mlflow": taken.getsockname()[1]}
        busy = cluster_up(tmp_path, ports)
    assert busy.returncode == 2 and busy.stderr.count("\n") == 1 and "--mlflow-port" in busy.stderr
    assert not (tmp_path / "cluster.json").exists()

    nothing = run(SAFEMERGE, "cluster", "status", "--state-dir", str(tmp_path))
    assert nothing.returncode == 0 and "no cluster is recorded" in nothing.stdout


def test_a_job_client_leaves_a_later_local_ray_reachable(tmp_path):
    """The nightly watcher and the tests build a job client and later start a local Ray in the same process. The
    client must not switch RAY_AUTH_MODE on for the process: Ray reads the mode once, so a local Ray started after
    it ran a GCS with token authentication that the process's own client could not reach (CI: "Failed to start
    GCS ... InvalidAuthToken")."""
    probe = f"""
import os, ray
from ray._raylet import get_authentication_mode
from safemerge.cluster.jobs import job_client
from safemerge.errors import UserError
get_authentication_mode()  # what any earlier use of Ray in the process does: the mode is read here, once
try:
    job_client("127.0.0.1:{free_port()}")
except UserError:
    pass
assert "RAY_AUTH_MODE" not in os.environ, os.environ["RAY_AUTH_MODE"]
ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
print(ray.get(ray.remote(lambda: "reachable").remote()))
ray.shutdown()
"""
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("a" * 32)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**env, "HOME": str(home)},
    )
    assert result.returncode == 0 and "reachable" in result.stdout, result.stderr[-3000:]
