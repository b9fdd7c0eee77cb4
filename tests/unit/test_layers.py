"""The import contracts (scripts/check_layers.py) and the namespace the package installs as."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("check_layers", REPO / "scripts" / "check_layers.py")
check_layers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_layers)


def tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_the_repository_keeps_its_contracts() -> None:
    assert check_layers.violations(REPO) == []


def test_search_importing_cluster_breaks_the_contract(tmp_path: Path) -> None:
    repo = tree(
        tmp_path,
        {
            "search/driver.py": "def run():\n    from safemerge.cluster.jobs import job_client\n",
            "cluster/job.py": "from safemerge.search import driver\n",  # the allowed direction
        },
    )
    found = check_layers.violations(repo)
    assert len(found) == 1
    assert found[0].startswith("search/driver.py:2: search imports safemerge.cluster.jobs (cluster)")


def test_merges_and_evaluators_never_import_each_other(tmp_path: Path) -> None:
    repo = tree(
        tmp_path,
        {
            "merges/engine.py": "from safemerge.evaluators import objectives\n",
            "evaluators/judges.py": "import safemerge.merges.recipe\n",
            "zoo/build.py": "from safemerge.evaluators import synthetic\n",  # allowed: the zoo uses the data
        },
    )
    assert sorted(line.split(":")[0] for line in check_layers.violations(repo)) == [
        "evaluators/judges.py",
        "merges/engine.py",
    ]


def test_old_top_level_names_are_refused_everywhere(tmp_path: Path) -> None:
    repo = tree(tmp_path, {"tests/test_x.py": "from merges.engine import MergeEngine\n", "safemerge/files.py": ""})
    assert check_layers.violations(repo) == [
        "tests/test_x.py:1: imports 'merges.engine'; the layers install as safemerge.merges"
    ]


def test_the_core_imports_no_layer(tmp_path: Path) -> None:
    repo = tree(tmp_path, {"safemerge/files.py": "from safemerge.search.config import SearchConfig\n"})
    assert "core imports safemerge.search.config (search)" in check_layers.violations(repo)[0]


def test_the_script_exits_1_on_a_broken_contract(tmp_path: Path) -> None:
    repo = tree(tmp_path, {"evaluators/x.py": "from safemerge.search import driver\n"})
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "check_layers.py"), str(repo)], capture_output=True)
    assert result.returncode == 1 and b"1 wrong imports" in result.stdout


def test_installed_as_one_namespace_from_any_folder(tmp_path: Path) -> None:
    """From a folder outside the checkout the layers import under safemerge.*, and no generic top-level module
    (common, merges, search, ...) is installed."""
    probe = (
        "import importlib.util, safemerge.merges.engine, safemerge.search, safemerge.cluster; "
        "print(sorted(m for m in ('common', 'merges', 'evaluators', 'search', 'cluster', 'zoo') "
        "if importlib.util.find_spec(m)))"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_pyproject_lists_every_package_of_the_tree() -> None:
    """A package folder missing from pyproject's list would be left out of a wheel (the editable install
    finds it anyway, so only this test notices)."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {"safemerge"}
    for layer in check_layers.LAYER_FOLDERS:
        for init in (REPO / layer).rglob("__init__.py"):
            parts = init.parent.relative_to(REPO).parts
            on_disk.add(".".join(("safemerge", *parts)))
    assert listed == on_disk


def test_every_layer_exports_what_its_all_lists() -> None:
    import importlib

    for layer in check_layers.LAYER_FOLDERS:
        package = importlib.import_module(f"safemerge.{layer}")
        missing = [name for name in package.__all__ if getattr(package, name, None) is None]
        assert missing == [], f"safemerge.{layer} lists {missing} in __all__ but has no such name"


def test_every_module_imports() -> None:
    """A broken import in a module only a long run reaches (a merge's save, a job's finalization) fails here."""
    import importlib

    for path in check_layers.python_files(REPO):
        parts = path.relative_to(REPO).with_suffix("").parts
        if parts[0] in check_layers.FREE_FOLDERS:
            continue
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        importlib.import_module(module if parts[0] == "safemerge" else f"safemerge.{module}")
