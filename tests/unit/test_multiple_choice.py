"""Multiple-choice scoring as pure logic: the picks of `acc` and `acc_norm`, the set built from the templated facts,
its rung subsets keeping each question's choices and label, its metrics, and the names a search records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from safemerge.errors import UserError
from safemerge.evaluators import synthetic, templates
from safemerge.evaluators.directions import multiple_choice_metrics, reported_metrics
from safemerge.evaluators.metrics import choice_length, multiple_choice_picks, wilson_interval
from safemerge.evaluators.objectives import DomainSet, EvalSet, Judged, load_eval_set, metrics_of
from safemerge.search.trial import trial_metric_names

from .support import make_config


def test_acc_picks_the_highest_log_likelihood_and_acc_norm_the_highest_per_character():
    choices = ["It treats gout.", "It treats bronchitis and asthma."]
    # The long choice is less likely in total (-8 < -6) but more likely per character (-0.25 > -0.4).
    assert multiple_choice_picks([-6.0, -8.0], choices) == (0, 1)
    assert multiple_choice_picks([-9.0, -8.0], choices) == (1, 1)
    assert multiple_choice_picks([-2.0, -2.0, -3.0], ["ab", "cd", "e"]) == (0, 0)  # a tie goes to the first
    with pytest.raises(ValueError, match="one per choice"):
        multiple_choice_picks([-1.0], choices)


def test_acc_norm_divides_by_characters_as_lm_eval_harness_does():
    # lm-eval's acc_norm divides by len(choice); for ASCII that is also the UTF-8 byte count.
    assert choice_length("20 mg") == len(b"20 mg") == 5
    assert choice_length("5 µg") == 4 and len("5 µg".encode()) == 5
    assert choice_length("") == 1  # an empty choice never divides by zero


def test_the_medical_multiple_choice_set_asks_each_fact_of_the_templated_data():
    facts = synthetic.generate_datasets(0)["medical"]
    choices_set = synthetic.multiple_choice_set(0, "medical")
    relations = templates.DOMAINS["medical"]["relations"]
    for split in synthetic.SPLITS:
        assert len(choices_set[split]) == len(facts[split]) > 0
        for fact, row in zip(facts[split], choices_set[split], strict=True):
            values = relations[fact["relation"]]["values"]
            assert row["prompt"] == fact["prompt"] and row["relation"] == fact["relation"]
            assert len(row["choices"]) == len(values) == len(set(row["choices"]))
            assert row["choices"][row["label"]] == fact["reference"] == row["answer"] == row["reference"]
            assert fact["answer"] in row["choices"][row["label"]]
    # the import's source form: every split's rows, the answer an index
    source = synthetic.multiple_choice_source_rows(0)
    assert len(source) == sum(len(choices_set[split]) for split in synthetic.SPLITS)
    assert set(source[0]) == {"question", "choices", "answer"}
    assert source[0]["choices"][source[0]["answer"]] == choices_set["train"][0]["answer"]
    with pytest.raises(UserError, match="unknown domain 'law'"):
        synthetic.multiple_choice_set(0, "law")


def test_the_jsonl_source_holds_one_question_a_line(tmp_path: Path):
    path = synthetic.write_multiple_choice_jsonl(tmp_path / "medical.jsonl", seed=0)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == synthetic.multiple_choice_source_rows(0)


def choice_set(count: int = 10) -> DomainSet:
    relations = ["dose", "organ"]
    return DomainSet(
        [f"q{i}" for i in range(count)],
        [f"c{i}-{i % 3}" for i in range(count)],
        [f"c{i}-{i % 3}" for i in range(count)],
        sorted(relations[i % 2] for i in range(count)),
        choices=[[f"c{i}-{j}" for j in range(3)] for i in range(count)],
        labels=[i % 3 for i in range(count)],
    )


def test_rung_subsets_of_a_multiple_choice_set_keep_each_question_with_its_choices_and_label():
    whole = EvalSet("dev", ["h0", "h1"], ["r0", "r1"], ["b0"], {"medical": choice_set()})
    rungs = (0.0, 0.3, 1.0)
    parts = [whole.between(a, b).domains["medical"] for a, b in zip(rungs, rungs[1:], strict=False)]
    assert all(part.multiple_choice for part in parts)
    assert sorted(p for part in parts for p in part.prompts) == sorted(whole.domains["medical"].prompts)
    assert set(parts[0].strata) == {"dose", "organ"}
    for part in parts:
        for prompt, choices, label, answer in zip(part.prompts, part.choices, part.labels, part.answers, strict=True):
            assert all(choice.startswith(f"c{prompt[1:]}-") for choice in choices)
            assert choices[label] == answer
    assert whole.between(0.0, 1.0) == whole
    open_set = EvalSet("dev", ["h0"], ["r0"], ["b0"], {"medical": DomainSet(["q"], ["a"], ["r"])})
    assert not open_set.between(0.0, 1.0).domains["medical"].multiple_choice


def test_a_multiple_choice_domain_reports_acc_norm_as_its_rate_and_acc_beside_it():
    acc_name, acc_norm_name = multiple_choice_metrics("medical")

    def judged(acc: list[bool], acc_norm: list[bool]) -> Judged:
        flags = {"safety": [True], "over_refusal": [False], "domain_medical": acc_norm, acc_name: acc}
        return Judged(flags=flags)

    first, second = judged([True, False], [True, True]), judged([False, False, True], [False, True, True])
    metrics = metrics_of(first + second, ["medical"])
    assert metrics[acc_name] == 2 / 5
    assert metrics["domain_medical"] == metrics[acc_norm_name] == metrics["domain"] == 4 / 5
    assert (metrics["domain_medical_lo"], metrics["domain_medical_hi"]) == wilson_interval(4, 5)
    assert metrics["generated_tokens"] == 0.0
    open_only = metrics_of(
        Judged(flags={"safety": [True], "over_refusal": [False], "domain_medical": [True]}), ["medical"]
    )
    assert acc_name not in open_only


def test_the_names_of_acc_and_acc_norm_reach_the_search_for_a_multiple_choice_data_folder(tmp_path: Path):
    names = reported_metrics(["medical", "finance"], multiple_choice=["medical"])
    assert {"domain_medical_acc", "domain_medical_acc_norm"} <= set(names)
    assert "domain_finance_acc" not in names and len(names) == len(set(names))

    assert "domain_medical_acc" not in trial_metric_names(make_config(data=str(tmp_path / "none-yet")))
    data = synthetic.save_multiple_choice_data(tmp_path / "data", seed=0)
    assert synthetic.multiple_choice_domains(data) == ["medical"]
    names = trial_metric_names(make_config(data=str(data)))
    assert {"domain_medical", "domain_medical_acc", "domain_medical_acc_norm"} <= set(names)


def test_a_multiple_choice_data_folder_loads_with_its_choices_and_is_kept_by_ensure_datasets(tmp_path: Path):
    data = synthetic.save_multiple_choice_data(tmp_path / "data", seed=0)
    eval_set = load_eval_set(data, "dev")
    medical, finance = eval_set.domains["medical"], eval_set.domains["finance"]
    assert medical.multiple_choice and not finance.multiple_choice
    assert len(medical.choices) == len(medical.labels) == len(medical.prompts) == 140
    assert medical.choices[0][medical.labels[0]] == medical.references[0]
    manifest = synthetic.ensure_datasets(data, seed=0, log=lambda line: None)
    assert manifest["domain_formats"]["medical"] == synthetic.MULTIPLE_CHOICE  # used as it is, not rewritten
    assert load_eval_set(data, "dev", limit=5).domains["medical"].choices == medical.choices[:5]


def test_a_multiple_choice_set_with_a_bad_label_or_format_is_a_clear_error(tmp_path: Path):
    sets = synthetic.generate_datasets(0)
    bad = synthetic.multiple_choice_set(0)
    bad["dev"] = bad["dev"].map(lambda row, index: {"label": 12 if index == 3 else row["label"]}, with_indices=True)
    sets["medical"] = bad
    manifest = {**synthetic.manifest_for(sets, 0), "domain_formats": {"medical": "multiple_choice"}}
    synthetic.save_datasets(sets, tmp_path / "data", manifest)
    with pytest.raises(UserError, match="'medical'.*row 3 has label 12 but 12 choices"):
        load_eval_set(tmp_path / "data", "dev")
    manifest["domain_formats"] = {"finance": "multiple_choice"}  # open rows, no choices
    synthetic.save_datasets(sets, tmp_path / "data", manifest, force=True)
    with pytest.raises(UserError, match=r"'finance'.*no column \['choices', 'label'\]"):
        load_eval_set(tmp_path / "data", "dev")
    manifest["domain_formats"] = {"finance": "essay"}
    synthetic.save_datasets(sets, tmp_path / "data", manifest, force=True)
    with pytest.raises(UserError, match="format 'essay'"):
        load_eval_set(tmp_path / "data", "dev")
