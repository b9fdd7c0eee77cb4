"""What a search has spent against its budget: trials, generated tokens and wall-clock minutes.

The study is the record, so the spend survives a killed driver: tokens are summed from the finished trials'
figures (pruned trials included: their rungs generated too), and each driver adds its wall time to a study
attribute as trials finish. The searcher asks `exhausted` before it asks the study for a trial, so no trial
starts once a limit is reached (search/searcher.py). The trials already running count at the mean cost of the
finished ones: with two trials per worker in flight, a search would otherwise overrun a token budget by up to
2 x workers - 1 trials."""

from __future__ import annotations

import time
from dataclasses import dataclass

import optuna

from safemerge.search.config import SearchConfig

SECONDS_ATTR = "driver_seconds"  # wall time of the search's earlier drivers, on the study
SPENT_STATES = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)


@dataclass(frozen=True)
class Spend:
    trials: int
    generated_tokens: int
    seconds: float

    def committed(self, running: int) -> Spend:
        """This spend with `running` trials counted at the mean tokens of the finished ones."""
        if not self.trials or not running:
            return self
        mean = self.generated_tokens / self.trials
        return Spend(self.trials, self.generated_tokens + round(running * mean), self.seconds)

    def metrics(self) -> dict[str, float]:
        """The spend as MLflow metrics of the parent run."""
        return {
            "spent_trials": float(self.trials),
            "spent_generated_tokens": float(self.generated_tokens),
            "spent_minutes": round(self.seconds / 60, 3),
        }


def recorded_seconds(study: optuna.Study) -> float:
    """The search's wall time as its drivers last recorded it on the study."""
    return float(study.user_attrs.get(SECONDS_ATTR, 0.0))


class SearchClock:
    """This driver's wall time on top of what the search's earlier drivers recorded on the study."""

    def __init__(self, study: optuna.Study) -> None:
        self.study = study
        self.before = recorded_seconds(study)
        self.started = time.monotonic()

    def seconds(self) -> float:
        return self.before + time.monotonic() - self.started

    def record(self) -> None:
        """Keep the total on the study, so a driver that resumes the search counts it (called as trials finish)."""
        self.study.set_user_attr(SECONDS_ATTR, round(self.seconds(), 3))


def spend_of(study: optuna.Study, seconds: float) -> Spend:
    trials = study.get_trials(deepcopy=False, states=SPENT_STATES)
    tokens = sum(int(trial.user_attrs.get("metrics", {}).get("generated_tokens", 0)) for trial in trials)
    return Spend(len(trials), tokens, seconds)


def exhausted(config: SearchConfig, spend: Spend) -> str | None:
    """The limit of `config` that `spend` has reached, in words; None while every limit has room."""
    budget = config.budget
    if spend.trials >= config.trials:
        return f"{config.trials} trials"
    if budget.generated_tokens is not None and spend.generated_tokens >= budget.generated_tokens:
        return f"{budget.generated_tokens:,} generated tokens"
    if budget.minutes is not None and spend.seconds >= budget.minutes * 60:
        return f"{budget.minutes:g} minutes"
    return None


def format_spend(config: SearchConfig, spend: Spend) -> str:
    """`tokens 45,120/200,000 | 3.2/10 min`: each figure over its limit where the config sets one."""
    budget = config.budget
    tokens = f"tokens {spend.generated_tokens:,}" + (
        f"/{budget.generated_tokens:,}" if budget.generated_tokens is not None else ""
    )
    minutes = f"{spend.seconds / 60:.1f}" + (f"/{budget.minutes:g}" if budget.minutes is not None else "") + " min"
    return f"{tokens} | {minutes}"
