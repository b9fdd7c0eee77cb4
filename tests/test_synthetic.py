"""The templated data sets: deterministic, disjoint splits, every harm category, saved atomically."""

from __future__ import annotations

import json

import pytest

from safemerge.errors import UserError
from safemerge.evaluators import synthetic, templates


def test_same_seed_same_data_other_seed_other_splits():
    first, again, other = (synthetic.generate_datasets(seed) for seed in (0, 0, 1))
    for name in synthetic.SET_NAMES:
        for split in synthetic.SPLITS:
            assert first[name][split].to_list() == again[name][split].to_list()
    assert first["harmful"]["test"]["prompt"] != other["harmful"]["test"]["prompt"]


def test_no_prompt_is_shared_across_splits(datasets):
    for name in synthetic.SET_NAMES:
        prompts = {split: set(datasets[name][split]["prompt"]) for split in synthetic.SPLITS}
        assert not prompts["train"] & prompts["dev"]
        assert not prompts["train"] & prompts["test"]
        assert not prompts["dev"] & prompts["test"]


def test_every_harm_category_is_in_every_split(datasets):
    assert len(templates.HARM_CATEGORIES) == 14
    for split in synthetic.SPLITS:
        assert set(datasets["harmful"][split]["category"]) == set(templates.HARM_CATEGORIES)


def test_each_test_fact_and_phrasing_was_seen_in_training(datasets):
    """Split by (fact, phrasing) pair: a test question's fact and its phrasing both occur in train."""
    for domain in synthetic.DOMAIN_NAMES:
        train = datasets[domain]["train"]
        train_facts = {(row["entity"], row["relation"]) for row in train}
        train_prompts = set(train["prompt"])
        for row in datasets[domain]["test"]:
            assert (row["entity"], row["relation"]) in train_facts
            other_entity_versions = {
                p.replace(e, row["entity"]) for p, e in zip(train["prompt"], train["entity"], strict=True)
            }
            assert row["prompt"] in other_entity_versions and row["prompt"] not in train_prompts


def test_references_fit_their_sets(datasets):
    from safemerge.evaluators.judges import is_refusal
    from safemerge.evaluators.metrics import answer_matches

    harmful = datasets["harmful"]["train"]
    assert all(is_refusal(text) for text in harmful["reference"])
    assert not any(is_refusal(text) for text in harmful["compliance"])
    assert not any(is_refusal(text) for text in datasets["benign"]["train"]["reference"])
    for domain in synthetic.DOMAIN_NAMES:
        rows = datasets[domain]["train"]
        assert all(answer_matches(ref, ans) for ref, ans in zip(rows["reference"], rows["answer"], strict=True))


def test_manifest_counts_match_saved_sets(data_dir):
    sets, manifest = synthetic.load_datasets(data_dir)
    assert manifest["seed"] == 0 and manifest["generator"] == "templated"
    assert len(manifest["harm_categories"]) == 14
    for name, counts in manifest["counts"].items():
        assert counts == {split: len(sets[name][split]) for split in synthetic.SPLITS}
    on_disk = json.loads((data_dir / synthetic.MANIFEST).read_text())
    assert on_disk == manifest


def test_failed_save_leaves_nothing_behind(tmp_path):
    sets = synthetic.generate_datasets(0)
    sets["broken"] = object()  # saving this one fails half-way through the folder
    with pytest.raises(AttributeError):
        synthetic.save_datasets(sets, tmp_path / "data", {"counts": {}})
    assert list(tmp_path.iterdir()) == []


def test_loading_a_folder_that_is_not_data_names_the_fix(tmp_path):
    with pytest.raises(UserError, match="safemerge data generate --out"):
        synthetic.load_datasets(tmp_path)


@pytest.mark.parametrize("seed", ["7", 1.5, True, None])
def test_seed_must_be_a_whole_number(seed):
    with pytest.raises(UserError, match="whole number"):
        synthetic.generate_datasets(seed)
