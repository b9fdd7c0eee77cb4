"""The search's console: the progress bar's text (counts, spend, hypervolume, ETA) from trial events, the bar with
the lines written above it, the plain lines off a terminal, where MLflow's runs are found, and the quiet
libraries."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import optuna
import pytest

from safemerge.search.budget import Spend
from safemerge.search.progress import (
    VERBOSE_ENV,
    SearchConsole,
    bar_text,
    libraries_verbose,
    mlflow_location,
    quiet_libraries,
    worker_env,
)

from .support import make_config


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_bar_counts_the_trials_and_shows_the_spend_the_hypervolume_and_the_eta_of_the_nearest_limit():
    config = make_config(**{"trials": 12, "budget.generated_tokens": 200000, "budget.minutes": 10})
    clock, lines = FakeClock(), []
    # A resumed search: 2 trials and 1,000 tokens in a minute spent by an earlier driver.
    console = SearchConsole(config, Spend(2, 1000, 60.0), log=lines.append, bar=False, clock=clock)
    assert bar_text(config, console.tally).endswith("| ETA ?")  # nothing finished here yet
    clock.now += 120
    console.trial_finished("[3/12] ties: ...", 3, 0, 0, Spend(3, 21000, 180.0), 0.1234)
    # Trials: 120 s a trial, 9 left (1,080 s); tokens: 20,000 in 120 s, 179,000 left (1,074 s); minutes: 420 s left.
    assert bar_text(config, console.tally) == (
        "3/12 done | pruned 0 | failed 0 | hypervolume 0.1234 | tokens 21,000/200,000 | 3.0/10 min | ETA 07:00"
    )
    clock.now += 40
    console.trial_finished("[4/12] ties: FAILED", 4, 1, 1, Spend(4, 101000, 220.0), 0.25)
    # Tokens now come first: 100,000 in 160 s, 99,000 left (158.4 s).
    assert bar_text(config, console.tally) == (
        "4/12 done | pruned 1 | failed 1 | hypervolume 0.2500 | tokens 101,000/200,000 | 3.7/10 min | ETA 02:38"
    )
    assert lines == ["[3/12] ties: ...", "[4/12] ties: FAILED"]  # off a terminal: the lines, as they come


def test_without_a_budget_but_the_trials_the_eta_is_the_pace_of_this_driver():
    config = make_config(trials=5)
    clock = FakeClock()
    console = SearchConsole(config, Spend(0, 0, 0.0), log=lambda line: None, bar=False, clock=clock)
    clock.now += 30
    console.trial_finished("[1/5] ...", 1, 0, 0, Spend(1, 500, 30.0), 0.5)
    clock.now += 30
    console.trial_finished("[2/5] ...", 2, 0, 0, Spend(2, 900, 60.0), 0.5)
    assert console.tally.eta_s == pytest.approx(90.0)
    assert bar_text(config, console.tally) == (
        "2/5 done | pruned 0 | failed 0 | hypervolume 0.5000 | tokens 900 | 1.0 min | ETA 01:30"
    )


def test_on_a_terminal_the_lines_go_above_one_bar_that_updates_in_place():
    config = make_config(trials=2, name="bar-test")
    terminal = io.StringIO()
    lines: list[str] = []
    clock = FakeClock()
    with contextlib.redirect_stdout(terminal):
        console = SearchConsole(config, Spend(0, 0, 0.0), log=lines.append, bar=True, clock=clock)
        with console.showing():
            print("MLflow at http://x did not answer")  # any other line of the driver, e.g. the mirror's
            clock.now += 10
            console.trial_finished("[1/2] ties: safety 0.90", 1, 0, 0, Spend(1, 10, 1.0), 0.3)
            console.say("bar-test: budget of 2 trials reached")
            console.trial_finished("[2/2] ties: safety 0.80", 2, 0, 0, Spend(2, 20, 2.0), 0.4)
    assert lines == []  # written above the bar, not to the log
    shown = terminal.getvalue()
    # Each line once, whole, on its own line; the bar redrawn in place (carriage returns, no newline between).
    finished_lines = [line for line in shown.replace("\r", "\n").split("\n") if line.startswith("[")]
    assert finished_lines == ["[1/2] ties: safety 0.90", "[2/2] ties: safety 0.80"]
    assert "MLflow at http://x did not answer\n" in shown and "budget of 2 trials reached\n" in shown
    last = shown.rstrip("\n").split("\n")[-1].split("\r")[-1]
    assert last.startswith("bar-test |#") and last.endswith(
        "| 2/2 done | pruned 0 | failed 0 | hypervolume 0.4000 | tokens 20 | 0.0 min | ETA 00:00"
    )


def test_the_bar_is_for_a_terminal_only():
    config = make_config()
    with contextlib.redirect_stdout(io.StringIO()):
        assert not SearchConsole(config, Spend(0, 0, 0.0)).wants_bar  # print, but not to a terminal
    assert not SearchConsole(config, Spend(0, 0, 0.0), log=lambda line: None).wants_bar


def test_a_sqlite_store_is_shown_as_the_command_that_serves_it_and_a_server_as_the_run_url(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = make_config(**{"name": "s1", "mlflow.tracking_uri": "sqlite:///artifacts/mlflow.db"})
    shown = mlflow_location(local, "sqlite:///artifacts/mlflow.db/#/experiments/1/runs/abc")
    assert shown == (
        f"'s1' in experiment 'safemerge'; browse it with "
        f"`mlflow ui --backend-store-uri sqlite:///{tmp_path / 'artifacts' / 'mlflow.db'}`"
    )
    assert Path(shown.split("sqlite:///")[1].rstrip("`")).is_absolute()
    server = make_config(**{"mlflow.tracking_uri": "http://127.0.0.1:5000"})
    url = "http://127.0.0.1:5000/#/experiments/1/runs/abc"
    assert mlflow_location(server, url) == url
    missing = "not yet created (MLflow at sqlite:///x.db did not answer)"
    assert mlflow_location(local, missing) == missing


@pytest.fixture
def restored_libraries(monkeypatch):
    """The environment and the loggers as they were, after the test."""
    for name in (VERBOSE_ENV, "VLLM_LOGGING_LEVEL", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "0")  # a user's own setting
    verbosity = optuna.logging.get_verbosity()
    yield
    optuna.logging.set_verbosity(verbosity)


def test_the_libraries_are_quiet_by_default_and_verbose_on_request(restored_libraries):
    optuna.logging.set_verbosity(optuna.logging.INFO)
    quiet_libraries()
    assert optuna.logging.get_verbosity() == optuna.logging.WARNING
    assert os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] == "true"
    assert os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] == "0"  # the user's own setting wins
    assert not libraries_verbose() and worker_env() == {"VLLM_LOGGING_LEVEL": "WARNING"}
    os.environ["VLLM_LOGGING_LEVEL"] = "ERROR"
    assert worker_env() == {"VLLM_LOGGING_LEVEL": "ERROR"}
    quiet_libraries(verbose=True)
    assert libraries_verbose() and worker_env() == {}
