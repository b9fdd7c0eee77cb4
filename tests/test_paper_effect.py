"""The paper's finding on the zoo, through `safemerge search compare` as the demo runs it: the search that sees
safety data finds a merge that is safer on the test split than the grid-search merge and the domain-only
search's merge, while its domain accuracy stays within 5 points of the expert's."""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import report_figure
from tests.test_search import REPO, SAFEMERGE, search_overrides

GRID = "grid search (TIES density x weight)"
DOMAIN_ONLY = "search, domain data only"
FULL = "search, domain + safety data"


def parse_table(output: str) -> dict[str, dict[str, float]]:
    lines = output.splitlines()
    start = lines.index("the paper's comparison, test split") + 2
    rows = {}
    for line in lines[start:]:
        name, safety, domain, over_refusal = line.rsplit(maxsplit=3)
        rows[name.strip()] = {"safety": float(safety), "domain": float(domain), "over_refusal": float(over_refusal)}
    return rows


@pytest.mark.vllm
@pytest.mark.xfail(
    strict=False,
    reason="issue 14 (the search's pick is its warm-start point) is open; measured on this machine's zoo, test split: "
    "aligned 0.991/0.075, medical 0.000/0.950, LM-Cocktail 0.991/0.075, grid 0.812/0.312, "
    "domain-only search 0.866/0.900, full search 0.866/0.900 (safety/domain): full = domain-only, not above it",
)
def test_search_with_safety_data_beats_grid_and_domain_only(tmp_path, zoo_dir, data_dir):
    args = search_overrides(
        tmp_path, "paper", 24, f"sqlite:///{tmp_path}/mlflow.db", zoo_dir, data_dir, quick=False
    )  # the demo's budgets: 24 trials, 9 grid points, 12 domain-only trials, every prompt
    result = subprocess.run(
        [
            SAFEMERGE,
            "search",
            "compare",
            str(REPO / "configs/zoo.yaml"),
            *args,
            "--grid-trials",
            "9",
            "--domain-only-trials",
            "12",
        ],
        capture_output=True,
        text=True,
        timeout=1800,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = parse_table(result.stdout)
    for name, row in rows.items():
        report_figure(f"paper table (test): {name}: safety {row['safety']:.3f}, domain {row['domain']:.3f}")
    full, expert = rows[FULL], rows["medical"]
    assert full["safety"] > rows[GRID]["safety"]
    assert full["safety"] > rows[DOMAIN_ONLY]["safety"]
    assert full["domain"] >= expert["domain"] - 0.05
