"""The paper's model-written data pipeline: on realistic hand-written generator outputs, and end to end
with zoo models (whose outputs are poor: the pipeline must survive them and say what it dropped)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from safemerge.evaluators import synthetic, templates
from safemerge.evaluators.generation import Generations
from safemerge.evaluators.judges import RefusalJudge
from safemerge.evaluators.metrics import normalize_answer
from safemerge.evaluators.pipeline import PipelineSettings, parse_question_list, parse_single_question, run_pipeline


class ScriptedModel:
    """Stands in for a strong instruct model (none can run here): answers from hand-written outputs."""

    def __init__(self, respond) -> None:
        self.respond = respond
        self.calls = 0
        self.replies: list[tuple[str, str]] = []  # (request, reply) of every call, in order

    def chat(self, conversations, max_tokens=64, temperature=0.0, seed=None) -> Generations:
        texts = []
        for conversation in conversations:
            self.calls += 1
            texts.append(self.respond(conversation[-1]["content"], self.calls))
            self.replies.append((conversation[-1]["content"], texts[-1]))
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


JSON_REPLY = "Sure! Here are the questions:\n"  # what realistic_generator writes before a complete JSON list


def refuses_by_checksum(prompt: str) -> bool:
    """About half the prompts, the same ones in every process (Python's hash() of a str changes per process)."""
    return zlib.crc32(prompt.encode()) % 2 == 0


def realistic_pool_member(refuses: Callable[[str], bool]):
    def respond(prompt: str, call: int) -> str:
        if refuses(prompt):
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
    strict = ScriptedModel(realistic_pool_member(refuses_by_checksum))
    pool = {"strict": strict, "lenient": ScriptedModel(realistic_pool_member(lambda prompt: False))}
    expert = ScriptedModel(
        lambda prompt, call: realistic_generator(prompt, call) if "Here are" in prompt else f"The answer is {call}."
    )
    settings = PipelineSettings(requests_per_category=3, domain_requests=30, seed=1)
    examples = {"medical": ["What does Zorvanex treat?", "What is the dose of Velmacort?", "Which organ?"]}
    sets, report = run_pipeline(
        generator, pool, {"medical": expert}, RefusalJudge(), examples, settings, log=lambda _: None
    )

    # Expected counts, from what the scripted models replied (not from the pipeline's own lists): a reply is a
    # complete JSON list only when it starts with JSON_REPLY; the rest (refusals, cut-off lists) are malformed.
    listed = [
        json.loads(reply.removeprefix(JSON_REPLY)) for _, reply in generator.replies if reply.startswith(JSON_REPLY)
    ]
    questions = [question for questions in listed for question in questions]
    unique = list(dict.fromkeys(questions))  # the scripted questions differ in words or numbers, not in case
    refused = {question for question in unique if refuses_by_checksum(question)}
    assert 0 < len(refused) < len(unique)  # the test's inputs exercise both kept and dropped questions

    harmful = report["steps"]["harmful_questions"]
    assert harmful["generator_outputs"] == len(generator.replies) == 14 * 3
    # Calls 7, 14, ..., 42 refuse; calls 5, 10, 15, 20, 25, 30, 40 are cut off: 13 of 42 outputs.
    assert harmful["malformed_outputs"] == 42 - len(listed) == 13
    assert harmful["parsed_outputs"] == len(listed) == 29
    assert harmful["questions_parsed"] == len(questions) == 3 * 29
    assert harmful["duplicates"] == len(questions) - len(unique)
    assert harmful["unique_questions"] == len(unique) == 29 + 2 * 14  # per category: each variant + 2 shared
    refusals = report["steps"]["refusals"]
    assert refusals["refused_by_strict"] == len(refused)
    assert refusals["refused_by_lenient"] == 0
    assert refusals["no_refusal_dropped"] == len(unique) - len(refused)
    assert refusals["kept"] == len(refused)
    assert sorted(request for request, _ in strict.replies) == sorted(unique)  # each unique question asked once
    assert sets is not None
    all_rows = [row for split in synthetic.SPLITS for row in sets["harmful"][split]]
    assert sorted(row["prompt"] for row in all_rows) == sorted(refused)
    assert all(row["reference"] == "I'm sorry, but I can't help with that request." for row in all_rows)
    assert all(row["category"] in templates.HARM_CATEGORIES for row in all_rows)
    for row in all_rows:  # each question keeps the category it was written for
        assert all(part.replace("_", " ") in row["prompt"] for part in row["category"].split(",")), row
    for name in ("harmful", "medical"):
        prompts = {split: set(sets[name][split]["prompt"]) for split in synthetic.SPLITS}
        assert not (prompts["train"] & prompts["dev"]) and not (prompts["dev"] & prompts["test"])
        assert not (prompts["train"] & prompts["test"])

    # The expert writes "N. What is the standard medical question number K?" with K = call % 9 for its 30
    # requests: 9 distinct questions, each answered once (calls 31 to 39).
    medical_questions = {f"What is the standard medical question number {number}?" for number in range(9)}
    domain = report["steps"]["domain_medical"]
    assert domain["expert_outputs"] == 30
    assert domain.get("malformed_outputs", 0) == 0
    assert domain["duplicates"] == 30 - 9
    assert domain["kept"] == 9 and domain.get("unanswered_dropped", 0) == 0
    medical_rows = [row for split in synthetic.SPLITS for row in sets["medical"][split]]
    assert sorted(row["prompt"] for row in medical_rows) == sorted(medical_questions)
    assert sorted(row["reference"] for row in medical_rows) == sorted(
        f"The answer is {call}." for call in range(31, 40)
    )
    assert report["counts"]["medical"] == {"train": 5, "dev": 2, "test": 2}  # 60/20/20 of 9 rows, rounded
    assert sum(report["counts"]["harmful"].values()) == len(refused)


class Recording:
    """Passes chats through to a real backend and keeps each call's requests and replies, so a test can derive
    what the pipeline should report from what the model actually said."""

    def __init__(self, backend) -> None:
        self.backend = backend
        self.calls: list[tuple[list[str], list[str | None]]] = []

    def chat(self, conversations, **options) -> Generations:
        generations = self.backend.chat(conversations, **options)
        self.calls.append(([conversation[-1]["content"] for conversation in conversations], list(generations.texts)))
        return generations

    def close(self) -> None:
        pass


@pytest.mark.vllm
def test_pipeline_survives_the_zoo_as_generator_and_reports_counts(engines):
    settings = PipelineSettings(requests_per_category=2, domain_requests=12, seed=0)
    examples = {"medical": synthetic.generate_datasets(0)["medical"]["train"]["prompt"][:6]}
    generator, expert = Recording(engines("aligned")), Recording(engines("medical"))
    sets, report = run_pipeline(
        generator,
        {"aligned": engines("aligned"), "medical": engines("medical")},
        {"medical": expert},
        RefusalJudge(),
        examples,
        settings,
        log=lambda _: None,
    )
    # What the report should say, from the recorded replies (each checked with the parsers tested above).
    [(_, generator_texts)] = generator.calls
    parsed = [parse_question_list(text or "") for text in generator_texts]
    harmful = report["steps"]["harmful_questions"]
    assert harmful["generator_outputs"] == len(generator_texts) == 28
    # A 1M-parameter zoo model cannot write JSON: its outputs are dropped as malformed, and counted.
    assert harmful.get("malformed_outputs", 0) == sum(questions is None for questions in parsed)
    assert harmful.get("parsed_outputs", 0) == sum(questions is not None for questions in parsed)
    assert harmful.get("malformed_outputs", 0) > 0

    (question_requests, question_texts), (asked, answers) = expert.calls
    assert len(question_requests) == 12
    written = [parse_single_question(text or "") for text in question_texts]
    seen = {normalize_answer(example) for example in examples["medical"]}
    new_questions = []
    for question in written:
        if question is not None and normalize_answer(question) and normalize_answer(question) not in seen:
            seen.add(normalize_answer(question))
            new_questions.append(question)
    answered = [question for question, answer in zip(asked, answers, strict=True) if answer and answer.strip()]
    domain = report["steps"]["domain_medical"]
    assert domain["expert_outputs"] == 12
    assert domain.get("malformed_outputs", 0) == sum(question is None for question in written)
    assert domain.get("duplicates", 0) == sum(question is not None for question in written) - len(new_questions)
    assert asked == new_questions  # the expert answers each new question once
    assert domain["kept"] == len(answered)
    assert domain.get("unanswered_dropped", 0) == len(new_questions) - len(answered)
    if not any(parsed):  # no harmful question at all: the pipeline says so instead of writing empty sets
        assert sets is None
        assert {"harmful/train", "harmful/dev", "harmful/test"} <= set(report["empty"])
    if sets is not None:
        medical_prompts = [prompt for split in synthetic.SPLITS for prompt in sets["medical"][split]["prompt"]]
        assert sorted(medical_prompts) == sorted(answered)
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
