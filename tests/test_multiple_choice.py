"""Multiple-choice domain scoring on the zoo: the medical expert against the aligned model on a multiple-choice set
of the medical facts, vLLM's prompt log-probs against transformers, and `safemerge eval` on such a data folder."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from safemerge.evaluators import synthetic
from safemerge.evaluators.generation import HFGenerator
from safemerge.evaluators.judges import RefusalJudge
from safemerge.evaluators.metrics import wilson_interval
from safemerge.evaluators.objectives import (
    DomainSet,
    Judged,
    judge_multiple_choice,
    judge_prompts,
    load_eval_set,
    metrics_of,
)
from safemerge.search.config import load_config
from safemerge.search.trial import ScoredShare, TrialWorker, single_model_recipe, trial_metric_names
from tests.conftest import REPO, SEED, report_figure


@pytest.fixture(scope="module")
def choice_data(tmp_path_factory) -> Path:
    """The templated data with the medical facts as a multiple-choice set (finance stays open questions)."""
    return synthetic.save_multiple_choice_data(tmp_path_factory.mktemp("choice-data") / "data", seed=SEED)


@pytest.fixture(scope="module")
def medical_choices(choice_data) -> DomainSet:
    """The medical questions of the dev and test splits together (280): no phrasing of them was trained on."""
    parts = [load_eval_set(choice_data, split, domains=["medical"]).domains["medical"] for split in ("dev", "test")]
    return DomainSet(
        **{item.name: [row for part in parts for row in getattr(part, item.name)] for item in fields(DomainSet)}
    )


RUNGS = ((0.0, 0.5), (0.5, 1.0))


def shares(acc: list[bool], acc_norm: list[bool]) -> tuple[float, float]:
    return sum(acc) / len(acc), sum(acc_norm) / len(acc_norm)


@pytest.mark.vllm
def test_the_medical_expert_picks_the_true_choice_more_often_than_the_aligned_model_beyond_the_intervals(
    engines, zoo_dir, medical_choices
):
    questions = len(medical_choices.prompts)
    verdicts = {}
    for model in ("medical", "aligned"):
        acc, acc_norm, skipped = judge_multiple_choice(engines(model), medical_choices)
        assert skipped == 0 and len(acc) == questions == 280
        verdicts[model] = {"acc": acc, "acc_norm": acc_norm}
        hf = HFGenerator(zoo_dir / model)
        try:
            hf_acc, hf_acc_norm, _ = judge_multiple_choice(hf, medical_choices)
        finally:
            hf.close()
        figures, hf_figures = shares(acc, acc_norm), shares(hf_acc, hf_acc_norm)
        report_figure(
            f"medical multiple choice (dev+test, {questions} questions, 12 choices), {model}: acc {figures[0]:.3f} "
            f"acc_norm {figures[1]:.3f} (vLLM); acc {hf_figures[0]:.3f} acc_norm {hf_figures[1]:.3f} (transformers)"
        )
        assert hf_figures == pytest.approx(figures, abs=0.01)
    # Chance is 1/12. The zoo's base read the facts as prose, so the aligned model finds most true sentences likely
    # too; the expert, trained on them as answers, is above it beyond both 95% intervals.
    for metric in ("acc", "acc_norm"):
        medical_low, _ = wilson_interval(sum(verdicts["medical"][metric]), questions)
        _, aligned_high = wilson_interval(sum(verdicts["aligned"][metric]), questions)
        assert medical_low > aligned_high, metric


@pytest.mark.vllm
def test_choice_log_likelihoods_agree_between_vllm_and_transformers(engines, zoo_dir, medical_choices):
    prompts = [
        p for p, choices in zip(medical_choices.prompts[:10], medical_choices.choices, strict=False) for _ in choices
    ]
    continuations = [c for choices in medical_choices.choices[:10] for c in choices]
    vllm_scores = engines("medical").score_continuations(prompts, continuations)
    hf_scores = HFGenerator(zoo_dir / "medical").score_continuations(prompts, continuations)
    assert all(score is not None and score < 0 for score in vllm_scores)
    assert vllm_scores == pytest.approx(hf_scores, rel=1e-3, abs=1e-3)
    # No end of sequence is scored: the same sentence as a reference (ending in eos, for the cross-entropy) adds
    # the eos token's term, so its log-likelihood is lower.
    reference = engines("medical").score_references(prompts[:1], continuations[:1])
    assert -reference.total_nll < vllm_scores[0] - 1e-6


@pytest.mark.vllm
def test_scoring_a_multiple_choice_domain_generates_nothing_for_it_and_rungs_add_up(engines, choice_data):
    eval_set = load_eval_set(choice_data, "dev", limit=24)
    medical = engines("medical")
    whole = judge_prompts(medical, eval_set, RefusalJudge())
    metrics = metrics_of(whole, list(eval_set.domains))
    acc, acc_norm, _ = judge_multiple_choice(medical, eval_set.domains["medical"])
    assert (metrics["domain_medical_acc"], metrics["domain_medical_acc_norm"]) == shares(acc, acc_norm)
    assert metrics["domain_medical"] == metrics["domain_medical_acc_norm"]
    assert metrics["domain_medical_lo"] <= metrics["domain_medical"] <= metrics["domain_medical_hi"]
    assert "domain_finance_acc" not in metrics and metrics["ce_domain"] > 0
    # Only the open sets are generated for: dropping the multiple-choice set changes no generated token.
    open_only = load_eval_set(choice_data, "dev", domains=["finance"], limit=24)
    assert judge_prompts(medical, open_only, RefusalJudge(), with_ce=False).generated_tokens == whole.generated_tokens
    # Two rungs' verdicts add up to the whole split's: each question keeps its choices and label in its rung.
    halves = [judge_prompts(medical, eval_set.between(a, b), RefusalJudge(), with_ce=False) for a, b in RUNGS]
    rungs = metrics_of(halves[0] + halves[1], list(eval_set.domains))
    for name in ("domain_medical", "domain_medical_lo", "domain_medical_hi", "domain_medical_acc"):
        assert rungs[name] == pytest.approx(metrics[name])


@pytest.mark.vllm
def test_safemerge_eval_scores_a_data_folder_with_a_multiple_choice_set(zoo_dir, choice_data):
    safemerge = Path(sys.executable).parent / "safemerge"
    result = subprocess.run(
        [str(safemerge), "eval", str(zoo_dir / "medical"), "--data", str(choice_data), "--limit", "24"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"domain_medical_acc", "domain_medical_acc_norm", "domain_finance"} <= set(metrics)
    assert re.search(r"^ +domain_medical_acc_norm +[0-9.]+", result.stdout, re.MULTILINE)  # the table shows it too
    assert metrics["domain_medical"] == metrics["domain_medical_acc_norm"] >= 0.8


@pytest.mark.vllm
def test_a_search_worker_scores_a_multiple_choice_domain_rung_by_rung(zoo_dir, choice_data, engines):
    engines("base")  # a session engine kept live: this worker's close must not end vLLM's shared state
    config = load_config(
        REPO / "configs" / "zoo.yaml",
        {"zoo_dir": str(zoo_dir), "data": str(choice_data), "evaluation.limit": 24},
    )
    worker = TrialWorker(config.model_dump(mode="json"))
    try:
        recipe = single_model_recipe("medical")
        first_rung = worker.evaluate(recipe, fidelity=0.5)
        full = worker.evaluate(recipe, fidelity=1.0)  # adds the other half's questions to the first rung's
        fresh = worker.evaluate(single_model_recipe("aligned"), fidelity=1.0)
        # A search's trial carries its scored share to the next rung, which may run after other recipes: the
        # continuation generates the second half only, as that half scored alone does.
        half, scored = worker.evaluate_rung(recipe, "dev", 0.5)
        worker.evaluate(single_model_recipe("aligned"), fidelity=0.5)
        continued, _ = worker.evaluate_rung(recipe, "dev", 1.0, scored)
        second_half, _ = worker.evaluate_rung(recipe, "dev", 1.0, ScoredShare(scored.key, 0.5, Judged()))
    finally:
        worker.close()
    names = trial_metric_names(config)
    for metrics in (first_rung, full, fresh):
        assert {"domain_medical", "domain_medical_acc", "domain_medical_acc_norm"} <= set(metrics) <= set(names)
    assert full["domain_medical"] == full["domain_medical_acc_norm"] == 1.0
    assert fresh["domain_medical_acc_norm"] < 1.0 and full["fidelity"] == 1.0
    assert continued["domain_medical"] == 1.0 and continued["fidelity"] == 1.0
    assert continued["generated_tokens"] == half["generated_tokens"] + second_half["generated_tokens"]
    assert 0 < second_half["generated_tokens"] < continued["generated_tokens"]
