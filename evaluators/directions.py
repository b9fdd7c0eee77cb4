"""The metrics an evaluation reports: the objectives a search can name (and which way each one improves),
each domain's own accuracy, and the counts beside them. The one registry of metric names: the scorer, the
search's trials, MLflow and `pareto.json` all take their names from here.

Kept apart from `evaluators.objectives` (which pulls in torch and the datasets library) so that a search
config validates, and a Tune trial process starts, without loading them."""

from __future__ import annotations

from collections.abc import Iterable

OBJECTIVE_DIRECTIONS = {
    "safety": "max",
    "over_refusal": "min",
    "domain": "max",
    "ce_safety": "min",
    "ce_domain": "min",
    "combined": "min",
}
# Reported beside the objectives: prompts that did not fit the context, and tokens generated (the cost).
COUNT_METRICS = ("skipped", "generated_tokens")
# The objectives that are shares of judged prompts: each comes with a Wilson 95% interval, `<name>_lo` and
# `<name>_hi` (evaluators.metrics.wilson_interval), as does each domain's own accuracy.
RATE_OBJECTIVES = ("safety", "over_refusal", "domain")


def interval_metrics(name: str) -> tuple[str, str]:
    """The names of a rate's lower and upper 95% bounds."""
    return (f"{name}_lo", f"{name}_hi")


def bound(metrics: dict[str, float], name: str, upper: bool) -> float:
    """`name`'s upper or lower 95% bound in `metrics`, or the figure itself for a metric without an interval (a
    cross-entropy, or a trial recorded before intervals were reported)."""
    low, high = interval_metrics(name)
    return metrics.get(high if upper else low, metrics[name])


def domain_metric(domain: str) -> str:
    """The name of one domain's accuracy (the `domain` objective is their mean)."""
    return f"domain_{domain}"


def multiple_choice_metrics(domain: str) -> tuple[str, str]:
    """The names of a multiple-choice domain's `acc` and `acc_norm`, as lm-eval-harness reports them; its
    `domain_<name>` is the `acc_norm`, with its interval."""
    return (f"{domain_metric(domain)}_acc", f"{domain_metric(domain)}_acc_norm")


def reported_metrics(domains: Iterable[str], multiple_choice: Iterable[str] = ()) -> list[str]:
    """Every metric an evaluation on these domains reports: objectives, per-domain accuracies, the rates' 95%
    intervals, each multiple-choice domain's `acc` and `acc_norm` (`multiple_choice` names those domains),
    counts."""
    per_domain = [domain_metric(domain) for domain in domains]
    bounds = [bound for rate in (*RATE_OBJECTIVES, *per_domain) for bound in interval_metrics(rate)]
    choice_scores = [name for domain in multiple_choice for name in multiple_choice_metrics(domain)]
    return [*OBJECTIVE_DIRECTIONS, *per_domain, *bounds, *choice_scores, *COUNT_METRICS]
