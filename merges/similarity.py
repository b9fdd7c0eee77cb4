"""Task-vector similarity (the MergeAlign paper's analysis): per layer group, cosine similarity and sign-conflict rate
between models' task vectors and each task vector's norm relative to the base; as a report and as flat metrics."""

from __future__ import annotations

import math
from itertools import combinations
from typing import TYPE_CHECKING

from safemerge.merges.recipe import layer_group, layer_index

if TYPE_CHECKING:
    from safemerge.merges.engine import MergeEngine


def _group_label(layers: list[int]) -> str:
    return f"layers {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}-{layers[-1]}"


def similarity_report(engine: MergeEngine, groups: int | None = None) -> dict:
    """{'groups': [{'group', 'cosine': {'a vs b': x}, 'sign_conflict': {...}, 'norm_ratio': {'a': x}}, ...]} with
    one entry per layer group, one for tensors outside the layers ('other') and one for the whole model ('all')."""
    num_layers = engine.num_layers
    groups = min(groups or num_layers, num_layers)
    buckets: dict[str, list[str]] = {}
    layers_of: dict[str, list[int]] = {}
    for index in range(num_layers):
        layers_of.setdefault(f"g{layer_group(index, groups, num_layers)}", []).append(index)
    for name in engine.float_names:
        index = layer_index(name)
        key = "other" if index is None else f"g{layer_group(index, groups, num_layers)}"
        buckets.setdefault(key, []).append(name)
    buckets["all"] = list(engine.float_names)

    models = engine.names
    pairs = list(combinations(range(len(models)), 2))
    rows = []
    for key in [*(f"g{g}" for g in range(groups)), "other", "all"]:
        names = buckets.get(key, [])
        if not names:
            continue
        gram = sum(engine.gram[name] for name in names)
        conflicts = {pair: 0 for pair in pairs}
        both_nonzero = {pair: 0 for pair in pairs}
        for name in names:
            for _, tensors in engine.iter_chunks(name):  # chunk by chunk: no task vector is held whole
                vectors = tensors[1:]
                for left, right in pairs:
                    product = vectors[left] * vectors[right]
                    conflicts[(left, right)] += int((product < 0).sum())
                    both_nonzero[(left, right)] += int((product != 0).sum())
        base_norm = math.sqrt(float(gram[0, 0]))
        rows.append(
            {
                "group": _group_label(layers_of[key]) if key in layers_of else key,
                "cosine": {
                    f"{models[left]} vs {models[right]}": float(gram[left + 1, right + 1])
                    / max(math.sqrt(float(gram[left + 1, left + 1]) * float(gram[right + 1, right + 1])), 1e-30)
                    for left, right in pairs
                },
                "sign_conflict": {
                    f"{models[left]} vs {models[right]}": conflicts[(left, right)] / max(both_nonzero[(left, right)], 1)
                    for left, right in pairs
                },
                "norm_ratio": {
                    model: math.sqrt(float(gram[index + 1, index + 1])) / max(base_norm, 1e-30)
                    for index, model in enumerate(models)
                },
            }
        )
    return {"base": engine.base_name, "models": models, "groups": rows}


def format_report(report: dict) -> str:
    """A plain-text table: one row per layer group."""
    pairs = list(report["groups"][0]["cosine"]) if report["groups"] else []
    models = report["models"]
    header = ["group", *(f"cos {pair}" for pair in pairs), *(f"conflict {pair}" for pair in pairs)]
    header += [f"|tau {model}|/|base|" for model in models]
    lines = [header]
    for row in report["groups"]:
        lines.append(
            [
                row["group"],
                *(f"{row['cosine'][pair]:.4f}" for pair in pairs),
                *(f"{row['sign_conflict'][pair]:.4f}" for pair in pairs),
                *(f"{row['norm_ratio'][model]:.4f}" for model in models),
            ]
        )
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def similarity_metrics(engine: MergeEngine, groups: int | None = None) -> dict[str, float]:
    """The report as flat metric names (letters, digits, '_', '-', '.', '/' only, as MLflow requires) -> value."""

    def clean(text: str) -> str:
        return "".join(char if char.isalnum() or char in "_-./" else "_" for char in text)

    metrics = {}
    for row in similarity_report(engine, groups)["groups"]:
        group = clean(row["group"])
        for kind in ("cosine", "sign_conflict", "norm_ratio"):
            for key, value in row[kind].items():
                metrics[f"similarity/{kind}/{clean(key)}/{group}"] = value
    return metrics
