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


def domain_metric(domain: str) -> str:
    """The name of one domain's accuracy (the `domain` objective is their mean)."""
    return f"domain_{domain}"


def reported_metrics(domains: Iterable[str]) -> list[str]:
    """Every metric an evaluation on these domains reports: objectives, per-domain accuracies, counts."""
    return [*OBJECTIVE_DIRECTIONS, *(domain_metric(domain) for domain in domains), *COUNT_METRICS]
