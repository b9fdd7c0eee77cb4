"""Ray Tune's searcher over a real Optuna study (in memory, and on sqlite for a resume), and the names of the
metrics a trial reports. No Ray cluster starts: the searcher is driven the way Tune drives it."""

from __future__ import annotations

import json
import math

import optuna
import pytest

from safemerge.evaluators.directions import OBJECTIVE_DIRECTIONS
from safemerge.merges.recipe import parse_recipe
from safemerge.search.driver import DefineByRun, requeue_interrupted, study_points
from safemerge.search.searcher import StudySearcher
from safemerge.search.space import standard_points
from safemerge.search.trial import single_model_recipe, trial_metric_names

from .support import make_config

TWO_EXPERTS = {"models.experts": {"medical": "zoo:medical", "finance": "zoo:finance"}}
State = optuna.trial.TrialState
COMPLETE, FAIL, RUNNING, WAITING = State.COMPLETE, State.FAIL, State.RUNNING, State.WAITING


def searcher_for(config, points=None) -> StudySearcher:
    sampler = optuna.samplers.RandomSampler(seed=0)
    study = optuna.create_study(directions=config.objectives.directions(), sampler=sampler)
    space = DefineByRun(config, num_layers=4)
    return StudySearcher(study, space, config.objectives, trial_metric_names(config), points_to_evaluate=points)


def result_for(trial_config: dict, **metrics: float) -> dict:
    """What a trial reports to Tune: its metrics and the recipe it ran, as JSON."""
    return {**metrics, "recipe_json": json.dumps(trial_config["recipe"], sort_keys=True)}


def test_suggest_asks_the_study_for_a_trial_and_returns_its_recipe():
    searcher = searcher_for(make_config())
    trial_config = searcher.suggest("tune-1")
    parse_recipe(trial_config["recipe"])
    [trial] = searcher.study.get_trials(states=(RUNNING,))
    assert trial_config["recipe"]["merge_method"] == trial.params["method"]
    assert len(trial.params) > 1
    second = searcher.suggest("tune-2")
    assert len(searcher.study.trials) == 2 and second != trial_config


def test_a_completed_trial_tells_the_objectives_and_keeps_metrics_recipe_and_constraint():
    config = make_config(**TWO_EXPERTS)
    searcher = searcher_for(config)
    trial_config = searcher.suggest("tune-1")
    metrics = {
        "safety": 0.9,
        "domain": 0.6,
        "over_refusal": 0.25,
        "domain_medical": 0.7,
        "domain_finance": 0.5,
        "generated_tokens": 1234,
        "worker": 0,
        "tune_internal_counter": 99.0,  # not a metric of the search: not kept
    }
    searcher.on_trial_complete("tune-1", result=result_for(trial_config, **metrics))
    [trial] = searcher.study.trials
    assert trial.state == COMPLETE
    assert trial.values == [0.9, 0.6]
    kept = {name: value for name, value in metrics.items() if name != "tune_internal_counter"}
    assert trial.user_attrs["metrics"] == kept
    assert trial.user_attrs["recipe"] == trial_config["recipe"]
    assert trial.user_attrs["constraint"] == [pytest.approx(0.15)]
    [found] = study_points(searcher.study)
    assert found.number == 0 and not found.feasible and found.metrics["domain_finance"] == 0.5


def test_optuna_sees_the_constraint_so_an_over_refusing_trial_is_not_best():
    config = make_config()
    searcher = searcher_for(config)
    for tune_id, metrics in (
        ("a", {"safety": 0.6, "domain": 0.6, "over_refusal": 0.05}),
        ("b", {"safety": 0.99, "domain": 0.99, "over_refusal": 0.6}),  # dominates a, but refuses benign prompts
    ):
        searcher.on_trial_complete(tune_id, result=result_for(searcher.suggest(tune_id), **metrics))
    assert [trial.number for trial in searcher.study.best_trials] == [0]


@pytest.mark.parametrize(
    "result, error",
    [
        ({"safety": 0.9, "domain": 0.5, "over_refusal": 0.0}, True),
        ({"safety": math.nan, "domain": 0.5, "over_refusal": 0.0}, False),
        ({"safety": 0.9, "domain": math.inf, "over_refusal": 0.0}, False),
        ({"safety": 0.9, "over_refusal": 0.0}, False),  # an objective missing
        (None, False),
    ],
)
def test_an_error_or_a_bad_objective_marks_the_trial_failed(result, error):
    searcher = searcher_for(make_config())
    trial_config = searcher.suggest("tune-1")
    reported = result_for(trial_config, **result) if result is not None else None
    searcher.on_trial_complete("tune-1", result=reported, error=error)
    [trial] = searcher.study.trials
    assert trial.state == FAIL
    assert "metrics" not in trial.user_attrs
    searcher.on_trial_complete("tune-1", result=reported)  # told once only: a repeat changes nothing
    assert [t.state for t in searcher.study.trials] == [FAIL]


def test_warm_start_points_are_the_first_suggestions():
    config = make_config(methods=["ties", "mergealign"])
    points = standard_points(config, num_layers=4)
    searcher = searcher_for(config, points)
    first, second = searcher.suggest("a")["recipe"], searcher.suggest("b")["recipe"]
    assert [first["merge_method"], second["merge_method"]] == ["ties", "mergealign"]
    assert [trial.params for trial in searcher.study.trials] == points


def test_the_grid_sampler_drives_the_grid_recipe():
    config = make_config(sampler="grid")
    study = optuna.create_study(directions=config.objectives.directions(), sampler=optuna.samplers.RandomSampler())
    recipe = DefineByRun(config, num_layers=4)(study.ask())["recipe"]
    assert recipe["merge_method"] == "ties"
    assert set(study.trials[0].params) == {"grid.weight", "grid.density"}


def test_an_interrupted_trial_runs_again_under_its_own_number_and_parameters(tmp_path):
    storage_url = f"sqlite:///{tmp_path}/optuna.db"
    config = make_config()
    space = DefineByRun(config, num_layers=4)
    study = optuna.create_study(
        study_name="resumed",
        storage=storage_url,
        directions=config.objectives.directions(),
        sampler=optuna.samplers.RandomSampler(seed=0),
    )
    finished = study.ask()
    space(finished)
    study.tell(finished, [0.5, 0.5])
    interrupted = study.ask()  # the driver is killed while this trial runs
    recipe = space(interrupted)["recipe"]
    number, params = interrupted.number, dict(interrupted.params)

    storage = optuna.storages.RDBStorage(storage_url)
    assert requeue_interrupted("resumed", storage) == 1
    resumed = optuna.load_study(study_name="resumed", storage=storage, sampler=optuna.samplers.RandomSampler(seed=9))
    assert [trial.state for trial in resumed.trials] == [COMPLETE, WAITING]
    again = resumed.ask()
    assert again.number == number
    assert space(again)["recipe"] == recipe
    assert again.params == params
    assert requeue_interrupted("resumed", storage) == 1  # it runs now; a second kill would requeue it again
    assert [trial.state for trial in resumed.trials] == [COMPLETE, WAITING]
    assert resumed.trials[0].values == [0.5, 0.5]  # the finished trial is kept as it was


def test_a_trial_reports_every_objective_each_domain_and_the_cost():
    config = make_config(**TWO_EXPERTS)
    names = trial_metric_names(config)
    assert set(OBJECTIVE_DIRECTIONS) <= set(names)
    assert {"domain_medical", "domain_finance", "generated_tokens", "skipped", "worker", "duration_s"} <= set(names)
    assert len(names) == len(set(names))
    assert "domain_finance" not in trial_metric_names(make_config())


def test_a_single_model_recipe_is_a_valid_linear_recipe_of_that_model_alone():
    recipe = parse_recipe(single_model_recipe("aligned"))
    assert recipe.merge_method == "linear"
    assert [(entry.model, entry.parameters) for entry in recipe.models] == [("aligned", {"weight": 1.0})]


@pytest.mark.parametrize("sampler", ["nsga2", "tpe", "random"])
def test_the_searcher_and_progress_pickle_without_their_study(sampler, tmp_path):
    """Tune writes both into tuner.pkl: the study (whose sampler may hold a lock) and callables stay behind."""
    from ray import cloudpickle

    from safemerge.search.driver import Progress
    from safemerge.search.samplers import make_sampler

    config = make_config(sampler=sampler, storage=f"sqlite:///{tmp_path}/optuna.db")
    study = optuna.create_study(
        study_name="pickled",
        storage=config.storage,
        directions=config.objectives.directions(),
        sampler=make_sampler(config, trials_so_far=0),
    )
    searcher = StudySearcher(study, DefineByRun(config, num_layers=4), config.objectives, trial_metric_names(config))
    searcher.suggest("tune-1")
    progress = Progress(config, study, 0, lambda: None, print)
    for thing in (searcher, progress):
        dumped = cloudpickle.dumps(thing)
        assert cloudpickle.loads(dumped).study is None
        assert str(tmp_path).encode() not in dumped  # nor the storage URL


def test_a_recipe_scored_before_is_reported_again_without_evaluating_and_kept_off_the_front():
    """karcher, arcee_fusion and ram have no searched parameter: a sampler may propose one again and again."""
    config = make_config()
    study = optuna.create_study(directions=config.objectives.directions())
    same = lambda trial: {"recipe": {"merge_method": "karcher", "n": trial.suggest_int("n", 1, 1)}}  # noqa: E731
    searcher = StudySearcher(study, same, config.objectives, trial_metric_names(config))
    first = searcher.suggest("tune-1")
    assert "repeat_of" not in first
    figures = {"safety": 0.9, "domain": 0.6, "over_refusal": 0.05, "generated_tokens": 900.0, "fidelity": 1.0}
    searcher.on_trial_complete("tune-1", result_for(first, **figures))

    second = searcher.suggest("tune-2")
    assert second["repeat_of"] == {"trial": 0, "metrics": {**figures, "generated_tokens": 0.0}}
    # what the trainable reports for it (search/trainable.py): the figures, the trial it repeats, no tokens
    reported = {**second["repeat_of"]["metrics"], "repeat_of": 0.0}
    searcher.on_trial_complete("tune-2", result_for(second, **reported))
    repeat = study.trials[1]
    assert repeat.state == COMPLETE and repeat.values == study.trials[0].values
    assert repeat.user_attrs["repeat_of"] == 0 and repeat.user_attrs["metrics"]["generated_tokens"] == 0.0
    assert [point.number for point in study_points(study)] == [0]  # one point on the front, not two copies
    assert searcher.suggest("tune-3")["repeat_of"]["trial"] == 0  # a repeat is never the one repeated
