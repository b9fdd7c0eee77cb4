"""The Tune trainable of one search trial: borrow a free worker actor, evaluate the recipe there, report.

A module of its own that imports Ray only: every Tune trial process imports it when it starts, and the
search's own modules (torch, Optuna, pydantic) would add seconds to the start of every search."""

from __future__ import annotations

import json

import ray
from ray import tune
from ray.util.queue import Queue


def run_trial(trial_config: dict, workers: list, free_workers: Queue) -> None:
    """Borrow a free worker, evaluate the recipe there, report a flat dict of metrics."""
    index = free_workers.get(block=True)
    try:
        metrics = ray.get(workers[index].evaluate.remote(trial_config["recipe"]))
    finally:
        free_workers.put(index)
    tune.report({**metrics, "recipe_json": json.dumps(trial_config["recipe"], sort_keys=True)})
