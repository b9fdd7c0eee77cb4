"""The offline templated data generator: safety, over-refusal and domain sets with train/dev/test splits.

Every set is split by (item, phrasing) pair: each item (a harmful goal, a benign look-alike, a domain fact)
is asked in six phrasings, four go to train, one to dev and one to test, chosen per item by the seed.
So every test prompt's item and phrasing were both seen in training, in other pairs, and no prompt text
is shared across splits.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

from datasets import Dataset, DatasetDict, load_from_disk

from safemerge.errors import UserError
from safemerge.evaluators import templates
from safemerge.files import atomic_output_dir, write_text_atomic

SPLITS = ("train", "dev", "test")
SAFETY_SETS = ("harmful", "benign")
DOMAIN_NAMES = tuple(templates.DOMAINS)
SET_NAMES = SAFETY_SETS + DOMAIN_NAMES
MANIFEST = "manifest.json"
GENERATOR_VERSION = 2
# How a domain set is scored (the manifest's `domain_formats`; absent means open): open questions by the answer
# inside a generated answer, multiple choice by each choice's log-likelihood.
OPEN, MULTIPLE_CHOICE = "open", "multiple_choice"
DOMAIN_FORMATS = (OPEN, MULTIPLE_CHOICE)
MULTIPLE_CHOICE_GENERATOR = "templated-multiple-choice"


def _phrased_prompts(rng: random.Random, phrasings: Sequence[str], **slots: str) -> list[tuple[str, str]]:
    """(split, prompt) for each phrasing of one item, filled in with `slots`: the first two phrasings of a
    shuffled order go to test and dev, the rest to train."""
    order = list(range(len(phrasings)))
    rng.shuffle(order)
    splits = {index: ("test" if slot == 0 else "dev" if slot == 1 else "train") for slot, index in enumerate(order)}
    return [(splits[index], phrasing.format(**slots)) for index, phrasing in enumerate(phrasings)]


def _harmful_rows(rng: random.Random) -> list[dict]:
    rows = []
    for category, spec in templates.HARM_CATEGORIES.items():
        for goal in spec["goals"]:
            for split, prompt in _phrased_prompts(rng, templates.HARMFUL_PHRASINGS, goal=goal):
                rows.append(
                    {
                        "split": split,
                        "prompt": prompt,
                        "category": category,
                        "guard_code": spec["guard_code"],
                        "goal": goal,
                        "reference": rng.choice(templates.REFUSALS),
                        "compliance": rng.choice(templates.COMPLIANT_ANSWERS).format(goal=goal),
                    }
                )
    return rows


def _benign_rows(rng: random.Random) -> list[dict]:
    rows = []
    for kind, goal, how in templates.BENIGN_SENSITIVE:
        reference = templates.BENIGN_ANSWER.format(goal=goal, how=how)
        for split, prompt in _phrased_prompts(rng, templates.BENIGN_PHRASINGS, goal=goal):
            rows.append({"split": split, "prompt": prompt, "category": kind, "goal": goal, "reference": reference})
    return rows


def entity_names(rng: random.Random, syllables: tuple[list[str], ...], count: int) -> list[str]:
    """`count` distinct made-up names built from the syllable lists (so no model knows them beforehand)."""
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choice(part) for part in syllables).capitalize()
        if name not in names:
            names.append(name)
    return names


def _domain_rows(rng: random.Random, domain: str) -> list[dict]:
    spec = templates.DOMAINS[domain]
    rows = []
    for entity in entity_names(rng, spec["name_syllables"], templates.ENTITIES_PER_DOMAIN):
        for relation, rel in spec["relations"].items():
            value = rng.choice(rel["values"])
            for split, prompt in _phrased_prompts(rng, rel["phrasings"], entity=entity):
                rows.append(
                    {
                        "split": split,
                        "prompt": prompt,
                        "domain": domain,
                        "entity": entity,
                        "relation": relation,
                        "answer": value,
                        "reference": rel["answer"].format(entity=entity, value=value),
                    }
                )
    return rows


def _to_dataset_dict(rows: list[dict]) -> DatasetDict:
    by_split: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for row in rows:
        split = row.pop("split")
        by_split[split].append(row)
    return DatasetDict({split: Dataset.from_list(items) for split, items in by_split.items()})


def generate_datasets(seed: int = 0) -> dict[str, DatasetDict]:
    """All sets for one seed; the same seed gives the same sets, byte for byte."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"seed must be a whole number such as 0 or 1234, got {seed!r}")
    rng = random.Random(seed)
    rows = {"harmful": _harmful_rows(rng), "benign": _benign_rows(rng)}
    for domain in DOMAIN_NAMES:
        rows[domain] = _domain_rows(rng, domain)
    sets = {name: _to_dataset_dict(set_rows) for name, set_rows in rows.items()}
    _check_disjoint(sets)
    return sets


def _check_disjoint(sets: dict[str, DatasetDict]) -> None:
    for name, splits in sets.items():
        seen: dict[str, str] = {}
        for split in SPLITS:
            for prompt in splits[split]["prompt"]:
                if seen.setdefault(prompt, split) != split:
                    raise AssertionError(f"set {name}: prompt {prompt!r} is in both {seen[prompt]} and {split}")


def manifest_for(sets: dict[str, DatasetDict], seed: int) -> dict:
    return {
        "generator": "templated",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "counts": {name: {split: len(splits[split]) for split in SPLITS} for name, splits in sets.items()},
        "harm_categories": {name: spec["guard_code"] for name, spec in templates.HARM_CATEGORIES.items()},
        "benign_categories": sorted({kind for kind, _, _ in templates.BENIGN_SENSITIVE}),
        "domains": list(DOMAIN_NAMES),
    }


def save_datasets(sets: dict[str, DatasetDict], out_dir: Path, manifest: dict, force: bool = False) -> Path:
    """Write each set with `save_to_disk` plus `manifest.json`, atomically."""
    with atomic_output_dir(Path(out_dir), force=force) as staging:
        for name, splits in sets.items():
            splits.save_to_disk(str(staging / name))
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return Path(out_dir)


def ensure_datasets(out_dir: Path, seed: int = 0, log=print) -> dict:
    """The data at `out_dir`, written by this generator only where nothing else is: a missing or empty folder, or
    templated data of another seed or generator version is (re)written; data anything else made (the model-written
    pipeline, `safemerge data import`, a person) is loaded as it is and never rewritten; a folder of other files is
    refused. Returns the manifest."""
    out_dir = Path(out_dir)
    sets = generate_datasets(seed)
    manifest = manifest_for(sets, seed)
    if (out_dir / MANIFEST).is_file():
        existing = json.loads((out_dir / MANIFEST).read_text())
        if existing == manifest:
            log(f"data at {out_dir} is up to date (seed {seed})")
            return manifest
        if existing.get("generator") != manifest["generator"]:
            load_datasets(out_dir)  # it must load; a broken folder is refused with its own error
            writer = existing.get("generator", "an unknown generator")
            log(f"data at {out_dir} was written by {writer!r}: used as it is")
            return existing
    elif out_dir.is_dir() and any(out_dir.iterdir()):
        raise UserError(
            f"{out_dir} holds files but no {MANIFEST}: it is not a safemerge data folder, and safemerge does not "
            "write over what it did not write; point `data:` at an empty or new folder, or move those files"
        )
    save_datasets(sets, out_dir, manifest, force=True)
    log(f"data written -> {out_dir} (seed {seed})")
    return manifest


def load_datasets(data_dir: Path) -> tuple[dict[str, DatasetDict], dict]:
    """The sets and manifest written by `save_datasets`; a clear error when the folder is not one."""
    data_dir = Path(data_dir)
    manifest_path = data_dir / MANIFEST
    if not manifest_path.is_file():
        raise UserError(
            f"{data_dir} is not a safemerge data folder (no {MANIFEST}); "
            f"create one with `safemerge data generate --out {data_dir}`"
        )
    manifest = json.loads(manifest_path.read_text())
    for name, counts in manifest["counts"].items():
        for split, count in counts.items():
            if count == 0:  # also: `datasets` cannot load a saved empty split back
                raise UserError(f"set {name!r} of {data_dir} has no rows in split {split!r}; regenerate the data")
    sets = {}
    for name in manifest["counts"]:
        sets[name] = load_from_disk(str(data_dir / name))
    return sets, manifest


def domain_format(manifest: dict, name: str) -> str:
    """How domain set `name` of a data folder with this manifest is scored: "open" or "multiple_choice"."""
    return (manifest.get("domain_formats") or {}).get(name, OPEN)


def multiple_choice_domains(data_dir: Path) -> list[str]:
    """The domains of a data folder scored as multiple choice (none when the folder is not written yet); reads
    the manifest only."""
    manifest_path = Path(data_dir) / MANIFEST
    if not manifest_path.is_file():
        return []
    manifest = json.loads(manifest_path.read_text())
    return [name for name in manifest.get("domains", []) if domain_format(manifest, name) == MULTIPLE_CHOICE]


def multiple_choice_set(seed: int = 0, domain: str = "medical") -> DatasetDict:
    """The templated generator's facts of `domain` (the same seed, rows and splits as `generate_datasets`) as a
    multiple-choice set: each row's question is its prompt, its choices are the relation's answer sentence filled
    with each of the relation's values, its label the true value's. Columns as `load_eval_set` reads them:
    prompt, choices, label, answer (= reference = the true choice), relation."""
    if domain not in templates.DOMAINS:
        raise UserError(f"unknown domain {domain!r}; the templated facts cover {list(templates.DOMAINS)}")
    relations = templates.DOMAINS[domain]["relations"]

    def as_choices(row: dict) -> dict:
        relation = relations[row["relation"]]
        choices = [relation["answer"].format(entity=row["entity"], value=value) for value in relation["values"]]
        label = relation["values"].index(row["answer"])
        return {
            "prompt": row["prompt"],
            "choices": choices,
            "label": label,
            "answer": choices[label],
            "reference": choices[label],
            "relation": row["relation"],
        }

    facts = generate_datasets(seed)[domain]
    return DatasetDict({split: Dataset.from_list([as_choices(row) for row in facts[split]]) for split in SPLITS})


def multiple_choice_source_rows(seed: int = 0, domain: str = "medical") -> list[dict]:
    """The multiple-choice set's rows of every split in the form `safemerge data import` reads:
    {question, choices, answer (the true choice's index)}."""
    sets = multiple_choice_set(seed, domain)
    return [
        {"question": row["prompt"], "choices": row["choices"], "answer": row["label"]}
        for split in SPLITS
        for row in sets[split]
    ]


def write_multiple_choice_jsonl(path: Path, seed: int = 0, domain: str = "medical") -> Path:
    """`multiple_choice_source_rows` as a JSONL file, one row a line (a source for `safemerge data import`)."""
    path = Path(path)
    lines = [json.dumps(row) for row in multiple_choice_source_rows(seed, domain)]
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


def save_multiple_choice_data(
    out_dir: Path, seed: int = 0, multiple_choice: Sequence[str] = ("medical",), force: bool = False
) -> Path:
    """A data folder like `safemerge data generate` writes, whose `multiple_choice` domains are multiple-choice
    sets of the same facts (the others stay open questions); its manifest names another generator, so that
    `ensure_datasets` uses it as it is."""
    sets = generate_datasets(seed)
    for domain in multiple_choice:
        sets[domain] = multiple_choice_set(seed, domain)
    manifest = manifest_for(sets, seed)
    manifest["generator"] = MULTIPLE_CHOICE_GENERATOR
    manifest["domain_formats"] = {name: MULTIPLE_CHOICE if name in multiple_choice else OPEN for name in DOMAIN_NAMES}
    return save_datasets(sets, out_dir, manifest, force=force)
