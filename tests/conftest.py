"""Session fixtures: the data sets and the zoo are built once (and reused across runs from ./artifacts),
vLLM engines are started once per model and shared by every test that needs them."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("SAFEMERGE_ARTIFACTS", REPO / "artifacts"))
SEED = 0
FIGURES: list[str] = []


def report_figure(line: str) -> None:
    """A measured figure to print in the test summary (CI logs show the zoo's behaviour this way)."""
    FIGURES.append(line)


def pytest_terminal_summary(terminalreporter) -> None:
    if FIGURES:
        terminalreporter.section("measured figures")
        for line in FIGURES:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    from safemerge.evaluators import synthetic  # imported here: the fast tier (tests/unit) needs neither

    out = ARTIFACTS / "data"
    sets = synthetic.generate_datasets(SEED)
    manifest = synthetic.manifest_for(sets, SEED)
    if not (out / synthetic.MANIFEST).is_file() or synthetic.load_datasets(out)[1] != manifest:
        synthetic.save_datasets(sets, out, manifest, force=True)
    return out


@pytest.fixture(scope="session")
def datasets(data_dir: Path) -> dict:
    from safemerge.evaluators import synthetic

    return synthetic.load_datasets(data_dir)[0]


@pytest.fixture(scope="session")
def zoo_dir() -> Path:
    """The zoo, built by the command a user runs. In its own process: inside the pytest process the same
    training ran 4x slower (836 s against 208 s), a cause not found yet."""
    import json
    import subprocess
    import sys

    from safemerge.zoo.build import ZooSpec, existing_zoo

    out = ARTIFACTS / "zoo"
    if existing_zoo(out, ZooSpec(), SEED) is None:
        safemerge = str(Path(sys.executable).parent / "safemerge")
        subprocess.run([safemerge, "zoo", "build", "--out", str(out), "--seed", str(SEED), "--reuse"], check=True)
        report_figure(f"zoo build: {json.loads((out / 'zoo.json').read_text())['build_seconds']} s")
    return out


@pytest.fixture(scope="session")
def engines(zoo_dir: Path):
    """engines(name) -> a running VLLMGenerator for zoo model `name`, started on first use."""
    from safemerge.evaluators.generation import VLLMGenerator

    running: dict[str, VLLMGenerator] = {}

    def get(name: str) -> VLLMGenerator:
        if name not in running:
            running[name] = VLLMGenerator(zoo_dir / name)
        return running[name]

    yield get
    for generator in running.values():
        generator.close()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 (sqlite store, proxied local artifacts), stopped at the end."""
    from safemerge.cluster.processes import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    yield server.start()
    server.stop()


@contextmanager
def mlflow_at(uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking and registry URIs set to `uri` for the block: a models:/ or mlflow-artifacts:/
    address resolves through them, and a Tracker earlier in this process pinned both elsewhere (which an
    environment variable does not override)."""
    import mlflow

    pinned = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(pinned[0])
        mlflow.set_registry_uri(pinned[1])
