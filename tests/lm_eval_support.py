"""Local lm-eval tasks over the zoo's facts (no hub): multiple choice and generation (the expert's reference
answer, word for word)."""

from __future__ import annotations

import json
from pathlib import Path

from safemerge.evaluators import synthetic

METRICS = "metric_list:\n  - metric: {first}\n    aggregation: mean\n    higher_is_better: true\n{more}"


def task_name(domain: str, kind: str) -> str:
    return f"zoo_{domain}_{kind}"


def write_tasks(folder: Path, domain: str = "medical", split: str = "test", seed: int = 0) -> Path:
    """A task folder for `TaskManager(include_path=folder)` with two tasks over the templated facts of one
    split: `zoo_DOMAIN_mc`, the facts as the multiple-choice set `safemerge.evaluators.synthetic` builds (each
    relation's answer sentence with each of its values), and `zoo_DOMAIN_gen`, exact match of the greedy answer
    with the true sentence."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = synthetic.multiple_choice_set(seed, domain)[split]
    documents = [
        {"question": row["prompt"], "choices": row["choices"], "label": row["label"], "reference": row["reference"]}
        for row in rows
    ]
    data = folder / f"{domain}-{split}.jsonl"
    data.write_text("".join(json.dumps(document) + "\n" for document in documents))
    common = (
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {data}\n"
        "test_split: test\n"
        'doc_to_text: "{{question}}"\n'
        'target_delimiter: ""\n'
    )
    (folder / f"{task_name(domain, 'mc')}.yaml").write_text(
        f"task: {task_name(domain, 'mc')}\n{common}"
        "output_type: multiple_choice\n"
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\n"
        + METRICS.format(first="acc", more="  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n")
    )
    (folder / f"{task_name(domain, 'gen')}.yaml").write_text(
        f"task: {task_name(domain, 'gen')}\n{common}"
        "output_type: generate_until\n"
        'doc_to_target: "{{reference}}"\n'
        "generation_kwargs:\n"
        "  until: []\n"
        "  max_gen_toks: 48\n"
        + METRICS.format(first="exact_match", more="    ignore_case: true\n    ignore_punctuation: true\n")
    )
    return folder
