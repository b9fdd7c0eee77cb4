"""The search's budget in evaluation cost: what a study has spent (trials, generated tokens, wall time across
drivers), which limit a spend reaches, and the searcher ending the search there without asking for a trial."""

from __future__ import annotations

import json

import optuna
import pytest
from ray.tune.search import Searcher

from safemerge.search.budget import SECONDS_ATTR, SearchClock, exhausted, format_spend, spend_of
from safemerge.search.driver import DefineByRun, Progress
from safemerge.search.searcher import StudySearcher
from safemerge.search.trial import trial_metric_names

from .support import make_config

State = optuna.trial.TrialState


def study_with(*trials: tuple[State, int | None]) -> optuna.Study:
    """A study of finished trials, each (state, generated tokens or None when it recorded no figures)."""
    study = optuna.create_study(directions=["maximize", "maximize", "minimize"])
    for state, tokens in trials:
        trial = study.ask()
        if tokens is not None:
            trial.set_user_attr("metrics", {"generated_tokens": float(tokens)})
        study.tell(trial, [0.5, 0.5, 0.1] if state == State.COMPLETE else None, state=state)
    return study


def test_the_spend_counts_every_finished_trial_and_the_tokens_of_pruned_ones_too():
    study = study_with((State.COMPLETE, 1000), (State.PRUNED, 250), (State.FAIL, None))
    study.ask()  # running: not spent yet
    spend = spend_of(study, 90.0)
    assert (spend.trials, spend.generated_tokens, spend.seconds) == (3, 1250, 90.0)
    assert spend.metrics() == {"spent_trials": 3.0, "spent_generated_tokens": 1250.0, "spent_minutes": 1.5}


@pytest.mark.parametrize(
    ("budget", "tokens", "seconds", "reached"),
    [
        ({}, 10**9, 10**6, None),  # no limit but the trials
        ({"budget.generated_tokens": 2000}, 1999, 0, None),
        ({"budget.generated_tokens": 2000}, 2000, 0, "2,000 generated tokens"),
        ({"budget.minutes": 1.5}, 0, 89.9, None),
        ({"budget.minutes": 1.5}, 0, 90.0, "1.5 minutes"),
        ({"trials": 3}, 0, 0, "3 trials"),
    ],
)
def test_a_budget_is_exhausted_by_the_first_limit_the_spend_reaches(budget, tokens, seconds, reached):
    config = make_config(**{"trials": 24, **budget})
    study = study_with((State.COMPLETE, tokens), (State.COMPLETE, 0), (State.PRUNED, 0))
    assert exhausted(config, spend_of(study, seconds)) == reached


def test_the_progress_line_shows_each_figure_against_its_limit():
    study = study_with((State.COMPLETE, 45120))
    limited = make_config(**{"budget.generated_tokens": 200000, "budget.minutes": 10})
    assert format_spend(limited, spend_of(study, 192.0)) == "tokens 45,120/200,000 | 3.2/10 min"
    assert format_spend(make_config(), spend_of(study, 192.0)) == "tokens 45,120 | 3.2 min"


def test_the_clock_adds_this_driver_to_the_time_earlier_drivers_recorded(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage, directions=["maximize"])
    study.set_user_attr(SECONDS_ATTR, 300.0)  # what a killed driver left
    clock = SearchClock(optuna.load_study(study_name="s", storage=storage))
    assert 300.0 <= clock.seconds() < 310.0
    clock.record()
    assert optuna.load_study(study_name="s", storage=storage).user_attrs[SECONDS_ATTR] >= 300.0


def test_the_searcher_ends_the_search_without_asking_the_study_once_the_budget_is_spent():
    config = make_config(**{"budget.generated_tokens": 100})
    study = optuna.create_study(directions=config.objectives.directions())
    lines: list[str] = []
    progress = Progress(config, study, 0, log=lines.append)
    searcher = StudySearcher(
        study,
        DefineByRun(config, num_layers=4),
        config.objectives,
        trial_metric_names(config),
        budget_exhausted=progress.spend_exhausted,
    )
    first = searcher.suggest("tune-1")
    assert isinstance(first, dict)
    metrics = {"safety": 0.9, "domain": 0.5, "over_refusal": 0.0, "generated_tokens": 120.0}
    searcher.on_trial_complete("tune-1", {**metrics, "recipe_json": json.dumps(first["recipe"])})
    assert searcher.suggest("tune-2") == Searcher.FINISHED
    assert searcher.suggest("tune-3") == Searcher.FINISHED
    assert len(study.trials) == 1  # no trial asked and left RUNNING
    assert lines == [
        f"{config.name}: budget of 100 generated tokens reached, counting the trials still running; no new trial starts"
    ]


def test_running_trials_count_at_the_mean_cost_of_the_finished_ones():
    config = make_config(**{"budget.generated_tokens": 1000})
    study = study_with((State.COMPLETE, 300), (State.PRUNED, 100))  # 200 a trial
    spend = spend_of(study, 0.0)
    assert spend.committed(0) == spend and spend.committed(2).generated_tokens == 800
    assert exhausted(config, spend.committed(2)) is None
    assert exhausted(config, spend.committed(3)) == "1,000 generated tokens"
    assert spend_of(study_with(), 0.0).committed(5).generated_tokens == 0  # nothing finished: no estimate
