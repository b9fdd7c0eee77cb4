"""Picking a merge from a finalized search's front: which entries finalize registers with weights, the front
table the parent run's description holds, and the one-line refusals of `safemerge pick`."""

from __future__ import annotations

import pytest
import yaml

from safemerge.cli import main
from safemerge.errors import UserError
from safemerge.search.pick import front_entry
from safemerge.search.run import with_weights
from safemerge.search.tracking import front_description

from .support import config_data, make_config


def summary_of(*trials: int) -> dict:
    entry = {
        "method": "ties",
        "dev": {
            "safety": 0.9,
            "safety_lo": 0.8,
            "safety_hi": 0.95,
            "domain": 0.5,
            "domain_medical": 0.4,
            "domain_finance": 0.6,
        },
        "test": {"safety": 0.85, "domain": 0.45},
        "registered_model": "safemerge-s",
        "aliases": [],
    }
    front = [{**entry, "trial": n, "version": n + 1, "weights": n == 1} for n in trials]
    return {"search": "s", "sampler": "tpe", "completed": 9, "failed": 1, "hypervolume": 0.42, "front": front}


@pytest.mark.parametrize(
    "mode, aliases, expected",
    [("picks", [], False), ("picks", ["balanced"], True), ("all", [], True), ("recipes", ["balanced"], False)],
)
def test_finalize_registers_weights_for_the_aliased_entries_by_default(mode, aliases, expected):
    assert make_config(register=mode).registration == mode
    assert with_weights(make_config(register=mode), aliases) is expected


def test_the_default_register_mode_is_picks_and_an_unknown_one_is_refused():
    assert make_config().registration == "picks"
    with pytest.raises(UserError, match="register"):
        make_config(register="everything")


def test_the_front_table_links_each_run_with_its_version_aliases_and_intervals():
    text = front_description(summary_of(3, 1), "7", {3: "run3", 1: "run1"}, {"2": ["balanced", "production"]})
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| trial"))
    assert header.split(" | ")[:4] == ["| trial", "method", "dev safety", "dev domain"]
    assert "test safety" in header and "dev domain_medical" in header and header.endswith("| aliases |")
    rows = [line for line in lines if line.startswith("| 3 ") or line.startswith("| 1 ")]
    assert len(rows) == 2
    assert "0.900 [0.800, 0.950]" in rows[0] and "[trial-3](#/experiments/7/runs/run3)" in rows[0]
    assert "safemerge-s v4 (recipe)" in rows[0] and rows[0].endswith("|  |")
    assert "safemerge-s v2 (weights)" in rows[1] and rows[1].endswith("| balanced, production |")
    assert "safemerge pick s TRIAL --alias production" in text


def test_pick_refuses_a_trial_off_the_front_and_a_search_not_finalized(tmp_path, capsys):
    with pytest.raises(UserError, match=r"trial 5 is not on the Pareto front of search 's' \(its front: 3, 1\)"):
        front_entry(summary_of(3, 1), 5)
    data = {**config_data(), "name": "unfinished", "results_dir": str(tmp_path)}
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "config.yaml").write_text(yaml.safe_dump(data))
    assert main(["pick", "unfinished", "2", "--results-dir", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "search 'unfinished' is not finalized" in error[0], error
    assert main(["pick", "nowhere", "2", "--results-dir", str(tmp_path)]) == 2
    assert "no search named 'nowhere'" in capsys.readouterr().err
