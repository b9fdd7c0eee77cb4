"""lm-eval-harness tasks scored through safemerge's engines (local task definitions over the zoo's facts)."""

from __future__ import annotations

from pathlib import Path

import pytest

from safemerge.errors import UserError
from safemerge.evaluators import synthetic
from safemerge.evaluators.generation import HFGenerator
from safemerge.evaluators.lm_eval_tasks import LmEvalDomain
from safemerge.evaluators.objectives import DomainSet, judge_multiple_choice
from safemerge.search.config import parse_config
from tests.conftest import report_figure
from tests.lm_eval_support import task_name, write_tasks

pytest.importorskip("lm_eval", reason="the lm-eval extra is not installed")


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory) -> Path:
    return write_tasks(tmp_path_factory.mktemp("lm-eval-tasks"))


def rates(verdicts: dict[str, list[bool]]) -> dict[str, float]:
    return {name: sum(flags) / len(flags) for name, flags in verdicts.items()}


def test_dev_and_test_documents_split_the_task_once_and_for_all(task_folder):
    domain = LmEvalDomain(task_name("medical", "mc"), task_folder, seed=0)
    dev, test = domain.documents("dev"), domain.documents("test")
    assert sorted(dev + test) == list(range(domain.document_count)) and not set(dev) & set(test)
    assert LmEvalDomain(task_name("medical", "mc"), task_folder, seed=0).documents("dev") == dev
    assert LmEvalDomain(task_name("medical", "mc"), task_folder, seed=1).documents("dev") != dev
    assert domain.metric == "acc_norm" and domain.metrics == ["acc_norm", "acc"]


@pytest.mark.vllm
@pytest.mark.parametrize("model", ["medical", "aligned"])
def test_multiple_choice_task_agrees_between_vllm_and_transformers(engines, zoo_dir, task_folder, model):
    domain = LmEvalDomain(task_name("medical", "mc"), task_folder, seed=0)
    documents = domain.documents("dev")
    hf = HFGenerator(zoo_dir / model)
    try:
        through_hf = rates(domain.judge(hf, documents))
    finally:
        hf.close()
    through_vllm = rates(domain.judge(engines(model), documents))
    report_figure(f"lm-eval {domain.task_name} on {model}: vLLM {through_vllm}, transformers {through_hf}")
    for metric in ("acc", "acc_norm"):
        assert abs(through_vllm[metric] - through_hf[metric]) <= 0.01


def test_lm_eval_scores_a_multiple_choice_set_as_safemerge_does(zoo_dir, task_folder):
    """Two implementations of the same scoring: lm-eval's own metrics over EngineLM's log-likelihoods, and
    safemerge's multiple-choice scorer on the data folder form of the same questions."""
    domain = LmEvalDomain(task_name("medical", "mc"), task_folder, seed=0)
    documents = domain.documents("dev")
    rows = synthetic.multiple_choice_set(0, "medical")["test"].select(documents)
    questions = DomainSet(
        list(rows["prompt"]), list(rows["answer"]), list(rows["reference"]),
        choices=[list(c) for c in rows["choices"]], labels=list(rows["label"]),
    )  # fmt: skip
    hf = HFGenerator(zoo_dir / "aligned")  # not perfect on these facts: wrong picks must agree too
    try:
        through_lm_eval = domain.judge(hf, documents)
        acc, acc_norm, skipped = judge_multiple_choice(hf, questions)
    finally:
        hf.close()
    assert skipped == 0
    assert through_lm_eval["acc"] == acc and through_lm_eval["acc_norm"] == acc_norm
    assert not all(acc_norm)


@pytest.mark.vllm
def test_generation_task_scores_the_expert_far_above_the_aligned_model(engines, task_folder):
    domain = LmEvalDomain(task_name("medical", "gen"), task_folder, seed=0)
    documents = domain.documents("dev")
    expert = rates(domain.judge(engines("medical"), documents))["exact_match"]
    aligned = rates(domain.judge(engines("aligned"), documents))["exact_match"]
    report_figure(f"lm-eval {domain.task_name} exact match: medical {expert:.3f}, aligned {aligned:.3f}")
    # Measured 0.925 and 0.00 on 40 documents: the expert answers with the reference sentence, the aligned model
    # does not know the facts.
    assert expert >= 0.8 and aligned <= 0.2


def test_bad_tasks_are_one_line_errors(task_folder, tmp_path):
    with pytest.raises(UserError, match="no task 'no_such_task'"):
        LmEvalDomain("no_such_task", task_folder)
    with pytest.raises(UserError, match="does not exist"):
        LmEvalDomain(task_name("medical", "mc"), tmp_path / "missing")
    perplexity = tmp_path / "perplexity"
    perplexity.mkdir()
    (perplexity / "zoo_perplexity.yaml").write_text(
        (task_folder / f"{task_name('medical', 'gen')}.yaml")
        .read_text()
        .replace(task_name("medical", "gen"), "zoo_perplexity")
        .replace("exact_match", "bleu")
    )
    with pytest.raises(UserError, match="0/1 per-document metric"):
        LmEvalDomain("zoo_perplexity", perplexity)


def test_the_config_names_lm_eval_domains_of_its_experts():
    models = {"base": "zoo:base", "aligned": "zoo:aligned", "experts": {"medical": "zoo:medical"}}
    config = parse_config({"name": "x", "models": models, "domain": {"medical": "lm_eval:medqa_4options"}}, "test")
    assert config.lm_eval_tasks() == {"medical": "medqa_4options"}
    for domain, message in (
        ({"finance": "lm_eval:medqa_4options"}, "not an expert's domain"),
        ({"medical": "medqa_4options"}, "must be 'data' or 'lm_eval:TASK'"),
        ({"medical": "lm_eval: "}, "names no task"),
    ):
        with pytest.raises(UserError, match=message):
            parse_config({"name": "x", "models": models, "domain": domain}, "test")
