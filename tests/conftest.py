"""Session fixtures: the data sets and the zoo are built once (and reused across runs from ./artifacts),
vLLM engines are started once per model and shared by every test that needs them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from evaluators import synthetic
from zoo.build import ZooSpec, build_zoo, existing_zoo

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
    out = ARTIFACTS / "data"
    sets = synthetic.generate_datasets(SEED)
    manifest = synthetic.manifest_for(sets, SEED)
    if not (out / synthetic.MANIFEST).is_file() or synthetic.load_datasets(out)[1] != manifest:
        synthetic.save_datasets(sets, out, manifest, force=True)
    return out


@pytest.fixture(scope="session")
def datasets(data_dir: Path) -> dict:
    return synthetic.load_datasets(data_dir)[0]


@pytest.fixture(scope="session")
def zoo_dir() -> Path:
    out = ARTIFACTS / "zoo"
    if existing_zoo(out, ZooSpec(), SEED) is None:
        manifest = build_zoo(out, seed=SEED, force=True)
        report_figure(f"zoo build: {manifest['build_seconds']} s")
    return out


@pytest.fixture(scope="session")
def engines(zoo_dir: Path):
    """engines(name) -> a running VLLMGenerator for zoo model `name`, started on first use."""
    from evaluators.generation import VLLMGenerator

    running: dict[str, VLLMGenerator] = {}

    def get(name: str) -> VLLMGenerator:
        if name not in running:
            running[name] = VLLMGenerator(zoo_dir / name)
        return running[name]

    yield get
    for generator in running.values():
        generator.close()
