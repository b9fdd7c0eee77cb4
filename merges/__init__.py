"""safemerge merges: checkpoints, task vectors, every merge method, per-layer/per-module recipes, the in-memory merge
engine, model folders, mergekit YAML import/export and task-vector similarity."""

from safemerge.merges.engine import MergeEngine
from safemerge.merges.methods import METHODS
from safemerge.merges.recipe import Recipe, from_mergekit_yaml, parse_recipe, per_layer, per_module, to_mergekit_yaml
from safemerge.merges.similarity import similarity_metrics, similarity_report

__all__ = [
    "METHODS",
    "MergeEngine",
    "Recipe",
    "from_mergekit_yaml",
    "parse_recipe",
    "per_layer",
    "per_module",
    "similarity_metrics",
    "similarity_report",
    "to_mergekit_yaml",
]
