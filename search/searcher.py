"""Ray Tune's searcher over an Optuna study, through Optuna's public ask-and-tell interface.

Each Tune trial asks the study for a trial, builds its recipe with the define-by-run space, and tells the
study the objectives when Tune reports them, with every metric, the recipe and the constraint values kept on
the Optuna trial. The study (on its persistent storage) is the record of truth; this searcher holds only the
trials that are running.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import optuna
from ray.tune.search import Searcher

from safemerge.search.config import ObjectivesConfig
from safemerge.search.trainable import REPEAT_OF, recipe_key


class DriverSide:
    """A Tune searcher or callback that lives in the driver only. Tune pickles both into its experiment state
    (`tuner.pkl`), which a resume here never reads (the study is the record): the attributes named in
    `driver_only` (the study, with its sampler and storage connection, and callables that reach the tracker) stay
    out of it. Some samplers cannot be pickled at all (Optuna 5.1's genetic samplers hold a lock), and a storage
    or MLflow URL is no business of a file on disk."""

    driver_only: tuple[str, ...] = ()

    def __getstate__(self) -> dict[str, Any]:
        return {key: None if key in self.driver_only else value for key, value in self.__dict__.items()}


class StudySearcher(DriverSide, Searcher):
    """Proposes trials from `study` with `space` (a function of an Optuna trial returning Tune's trial config),
    and tells the study what each trial scored; `metric_names` are the metrics kept on each trial."""

    driver_only = ("study", "space", "running", "budget_exhausted")

    def __init__(
        self,
        study: optuna.Study,
        space: Callable[[optuna.Trial], dict[str, Any]],
        objectives: ObjectivesConfig,
        metric_names: Sequence[str],
        points_to_evaluate: Sequence[dict[str, Any]] | None = None,
        budget_exhausted: Callable[[int], str | None] | None = None,
    ) -> None:
        modes = ["max" if direction == "maximize" else "min" for direction in objectives.directions()]
        super().__init__(metric=objectives.names(), mode=modes)
        self.study, self.space, self.objectives = study, space, objectives
        self.metric_names = list(metric_names)
        self.running: dict[str, optuna.Trial] = {}
        self.budget_exhausted = budget_exhausted
        for point in points_to_evaluate or []:
            self.study.enqueue_trial(point)

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        # Checked before the study is asked: a trial asked and never run would stay RUNNING in the record.
        if self.budget_exhausted is not None and self.budget_exhausted(len(self.running)) is not None:
            return Searcher.FINISHED
        trial = self.study.ask()
        self.running[trial_id] = trial
        trial_config = self.space(trial)
        earlier = self._scored_before(trial_config["recipe"])
        if earlier is not None:
            # The exact recipe of a trial scored on the whole split (a method with no searched parameter, proposed
            # again): the trial reports those figures without evaluating (search/trainable.py), so the sampler is
            # told and nothing is generated twice.
            metrics = {**earlier.user_attrs["metrics"], "generated_tokens": 0.0}
            trial_config[REPEAT_OF] = {"trial": earlier.number, "metrics": metrics}
        return trial_config

    def _scored_before(self, recipe: dict) -> optuna.trial.FrozenTrial | None:
        # Trials keep their recipe as reported (parsed from `recipe_json`): this one in the same form, once.
        reported = json.loads(recipe_key(recipe))
        for trial in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            if REPEAT_OF not in trial.user_attrs and trial.user_attrs.get("recipe") == reported:
                return trial
        return None

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        trial = self.running.pop(trial_id, None)
        if trial is None:
            return
        names = [*self.objectives.names(), *self.objectives.constraints]
        if not error and result and result.get("fidelity", 1.0) < 1.0:
            # Stopped at an early rung by the multi-fidelity scheduler: pruned, with the figures it had.
            self._keep_figures(trial, result)
            self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            return
        if error or not result or not all(_finite(result.get(name)) for name in names):
            # Failed, or a figure Optuna cannot compare (missing, NaN): recorded as failed, never left RUNNING.
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            return
        self._keep_figures(trial, result)
        if REPEAT_OF in result:
            trial.set_user_attr(REPEAT_OF, int(result[REPEAT_OF]))
        violations = self.objectives.violations(result)
        trial.set_user_attr("constraint", violations)
        for name, value in zip(self.objectives.constraints, violations, strict=True):
            trial.set_constraint(name, value)
        self.study.tell(trial, [result[name] for name in self.objectives.names()])

    def _keep_figures(self, trial: optuna.Trial, result: dict) -> None:
        metrics = {key: float(result[key]) for key in self.metric_names if key in result}
        trial.set_user_attr("metrics", metrics)
        trial.set_user_attr("recipe", json.loads(result["recipe_json"]))

    # Tune checkpoints its searcher; the study's storage already holds everything, so the checkpoint names it.
    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "w") as file:
            json.dump({"study": self.study.study_name, "running": len(self.running)}, file)

    def restore(self, checkpoint_path: str) -> None:
        """Nothing to restore: a resumed search reopens the study (see `search.driver.prepare_search`)."""


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)
