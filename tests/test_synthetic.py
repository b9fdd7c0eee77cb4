"""The templated data sets: deterministic, disjoint splits, every harm category, saved atomically."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from safemerge.errors import UserError
from safemerge.evaluators import synthetic, templates

REPO = Path(__file__).resolve().parents[1]


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


# Data the templated generator did not write is never rewritten, by `data generate --reuse` or by a Ray job.


def folder_bytes(folder) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def model_written_folder(data_dir, out):
    """A data folder as the model-written pipeline leaves it: its own manifest (generator 'pipeline')."""
    sets, _ = synthetic.load_datasets(data_dir)
    report = {"generator": "pipeline", "seed": 3, "counts": {n: {s: len(d[s]) for s in d} for n, d in sets.items()}}
    synthetic.save_datasets(sets, out, report)
    return out


def test_data_another_generator_wrote_is_used_as_it_is_and_never_rewritten(data_dir, tmp_path):
    folder = model_written_folder(data_dir, tmp_path / "model-written")
    before = folder_bytes(folder)
    manifest = synthetic.ensure_datasets(folder, seed=0, log=lambda line: None)
    assert manifest["generator"] == "pipeline" and folder_bytes(folder) == before


def test_a_folder_of_other_files_is_refused_and_left_alone(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("not safemerge data")
    with pytest.raises(UserError, match="does not write over what it did not write"):
        synthetic.ensure_datasets(folder, seed=0)
    assert folder_bytes(folder) == {"notes.txt": b"not safemerge data"}


def test_templated_data_of_another_seed_is_rewritten(tmp_path):
    folder = tmp_path / "templated"
    sets = synthetic.generate_datasets(1)
    synthetic.save_datasets(sets, folder, synthetic.manifest_for(sets, 1))
    assert synthetic.ensure_datasets(folder, seed=0, log=lambda line: None)["seed"] == 0
    assert json.loads((folder / synthetic.MANIFEST).read_text())["seed"] == 0


def test_the_ray_jobs_inputs_keep_model_written_data_and_build_only_the_named_zoo_models(
    data_dir, zoo_dir, tmp_path, monkeypatch
):
    from safemerge.cluster import job
    from safemerge.search.config import load_config
    from safemerge.zoo import build

    folder = model_written_folder(data_dir, tmp_path / "model-written")
    before = folder_bytes(folder)
    config = load_config(REPO / "configs/zoo.yaml", {"data": str(folder), "zoo_dir": str(zoo_dir)})
    asked = []  # which zoo models the job asks for (the real build still runs, and finds them up to date)
    real = build.ensure_zoo
    monkeypatch.setattr(build, "ensure_zoo", lambda *a, **k: asked.append(k["models"]) or real(*a, **k))
    job.prepare_inputs(config, log=lambda line: None)
    assert folder_bytes(folder) == before
    used = {config.models.base, config.models.aligned, *config.models.experts.values()}
    if config.evaluation.judge.startswith("guard"):
        used.add(config.models.guard)
    assert asked == [sorted(ref.removeprefix("zoo:") for ref in used)]
