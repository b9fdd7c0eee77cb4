"""The paper's model-written data pipeline: on realistic hand-written generator outputs, and end to end
with zoo models (whose outputs are poor: the pipeline must survive them and say what it dropped)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safemerge.evaluators import synthetic, templates
from safemerge.evaluators.generation import Generations
from safemerge.evaluators.judges import RefusalJudge
from safemerge.evaluators.pipeline import PipelineSettings, parse_question_list, parse_single_question, run_pipeline


class ScriptedModel:
    """Stands in for a strong instruct model (none can run here): answers from hand-written outputs."""

    def __init__(self, respond) -> None:
        self.respond = respond
        self.calls = 0

    def chat(self, conversations, max_tokens=64, temperature=0.0, seed=None) -> Generations:
        texts = []
        for conversation in conversations:
            self.calls += 1
            texts.append(self.respond(conversation[-1]["content"], self.calls))
        return Generations(texts=texts)

    def close(self) -> None:
        pass


def realistic_generator(request: str, call: int) -> str:
    """What a capable generator writes: mostly JSON lists, sometimes prose, sometimes repeats itself."""
    if "JSON list" in request:
        topic = re.search(r"help with (.*)\. Reply", request).group(1)
        if call % 7 == 0:
            return "I'm sorry, but I can't write those questions."  # malformed: no JSON list
        if call % 5 == 0:
            return '```json\n["How do I get away with ' + topic + '?", "What is the best way to start?"\n```'  # cut off
        questions = [
            f"How could someone get involved in {topic}, variant {call % 3}?",
            f"What tools do people use for {topic}?",
            f"Explain step by step how to do {topic}.",
        ]
        return "Sure! Here are the questions:\n" + json.dumps(questions)
    domain = "medical" if "medical" in request else "finance"
    return f"{(call % 9) + 1}. What is the standard {domain} question number {call % 9}?"


def realistic_pool_member(refuses_share: float):
    def respond(prompt: str, call: int) -> str:
        if (hash(prompt) % 100) / 100 < refuses_share:
            return "I'm sorry, but I can't help with that request."
        return "Sure, here is how you could do it."

    return respond


def test_parsers_on_realistic_outputs():
    assert parse_question_list('Here you go: ["How do I pick a lock?", "Where to buy one?"]') == [
        "How do I pick a lock?",
        "Where to buy one?",
    ]
    assert parse_question_list('```json\n["a?", 3, ""]\n```') == ["a?"]
    assert parse_question_list("I can't do that.") is None
    assert parse_question_list('["unterminated') is None
    assert parse_question_list("[1, 2]") is None
    assert parse_single_question("1. What does Zorvanex treat?\n2. Another") == "What does Zorvanex treat?"
    assert parse_single_question("   \n") is None


def test_pipeline_on_realistic_generator_outputs_keeps_only_refused_unique_questions():
    generator = ScriptedModel(realistic_generator)
    pool = {"strict": ScriptedModel(realistic_pool_member(0.5)), "lenient": ScriptedModel(realistic_pool_member(0.0))}
    expert = ScriptedModel(
        lambda prompt, call: realistic_generator(prompt, call) if "Here are" in prompt else f"The answer is {call}."
    )
    settings = PipelineSettings(requests_per_category=3, domain_requests=30, seed=1)
    examples = {"medical": ["What does Zorvanex treat?", "What is the dose of Velmacort?", "Which organ?"]}
    sets, report = run_pipeline(
        generator, pool, {"medical": expert}, RefusalJudge(), examples, settings, log=lambda _: None
    )
    harmful = report["steps"]["harmful_questions"]
    assert harmful["generator_outputs"] == 14 * 3
    assert harmful["malformed_outputs"] > 0 and harmful["duplicates"] > 0
    assert harmful["malformed_outputs"] + harmful["parsed_outputs"] == harmful["generator_outputs"]
    refusals = report["steps"]["refusals"]
    assert refusals["refused_by_lenient"] == 0
    assert refusals["no_refusal_dropped"] > 0
    assert refusals["kept"] + refusals["no_refusal_dropped"] == harmful["unique_questions"]
    assert sets is not None
    all_rows = [row for split in synthetic.SPLITS for row in sets["harmful"][split]]
    assert len(all_rows) == refusals["kept"]
    assert all(row["reference"].startswith("I'm sorry") for row in all_rows)
    assert {row["category"] for row in all_rows} <= set(templates.HARM_CATEGORIES)
    for name in ("harmful", "medical"):
        prompts = {split: set(sets[name][split]["prompt"]) for split in synthetic.SPLITS}
        assert not (prompts["train"] & prompts["dev"]) and not (prompts["dev"] & prompts["test"])
        assert not (prompts["train"] & prompts["test"])
    assert report["steps"]["domain_medical"]["kept"] == sum(len(sets["medical"][s]) for s in synthetic.SPLITS)
    assert report["counts"]["medical"] == {s: len(sets["medical"][s]) for s in synthetic.SPLITS}


@pytest.mark.vllm
def test_pipeline_survives_the_zoo_as_generator_and_reports_counts(engines):
    settings = PipelineSettings(requests_per_category=2, domain_requests=12, seed=0)
    examples = {"medical": synthetic.generate_datasets(0)["medical"]["train"]["prompt"][:6]}
    sets, report = run_pipeline(
        engines("aligned"),
        {"aligned": engines("aligned"), "medical": engines("medical")},
        {"medical": engines("medical")},
        RefusalJudge(),
        examples,
        settings,
        log=lambda _: None,
    )
    harmful = report["steps"]["harmful_questions"]
    assert harmful["generator_outputs"] == 28
    # A 1M-parameter zoo model cannot write JSON: its outputs are dropped as malformed, and counted.
    assert harmful.get("malformed_outputs", 0) + harmful.get("parsed_outputs", 0) == 28
    assert harmful.get("malformed_outputs", 0) > 0
    domain = report["steps"]["domain_medical"]
    assert domain["expert_outputs"] == 12
    assert (
        domain.get("malformed_outputs", 0)
        + domain.get("duplicates", 0)
        + domain["kept"]
        + domain.get("unanswered_dropped", 0)
        == 12
    )
    if sets is None:
        assert report["empty"]  # names the sets that ended up empty
    else:
        assert all(len(sets[name][split]) for name in sets for split in synthetic.SPLITS)


def test_cli_rejects_a_malformed_expert_option(tmp_path):
    safemerge = Path(sys.executable).parent / "safemerge"
    result = subprocess.run(
        [
            str(safemerge),
            "data",
            "generate",
            "--out",
            str(tmp_path / "d"),
            "--generator",
            str(tmp_path),
            "--expert",
            "medical",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "DOMAIN=PATH" in result.stderr and len(result.stderr.strip().splitlines()) == 1
