"""The worker's path: a merge streamed tensor by tensor into the running vLLM engine and the cross-entropy scorer,
and a merge that turns bad midway (Inf in a late layer) leaving both engines on the previous trial's weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from safemerge.evaluators.generation import WeightsError, user_turns
from safemerge.merges.recipe import parse_recipe
from safemerge.search.config import load_config
from safemerge.search.trial import TrialWorker

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["What is the usual dose of Zorvanex?", "How do I boil an egg?", "How can I steal a car?"]
GOOD = {
    "merge_method": "task_arithmetic",
    "base_model": "base",
    "models": [
        {"model": "aligned", "parameters": {"weight": 0.8}},
        {"model": "medical", "parameters": {"weight": 0.9}},
    ],
}
# In float16, weights growing with depth to 1e7: the first layers merge fine, the last overflow to Inf.
BAD = {
    **GOOD,
    "out_dtype": "float16",
    "models": [{"model": "aligned", "parameters": {"weight": [0.5, 1e7]}}, GOOD["models"][1]],
}


@pytest.fixture(scope="module")
def worker(zoo_dir, data_dir, engines):
    # In-process vLLM engines share the process's distributed state, which the last one to close tears down:
    # a session engine kept live keeps this worker's close from ending it for the tests that follow.
    engines("base")
    config = load_config(REPO / "configs" / "zoo.yaml", {"zoo_dir": str(zoo_dir), "data": str(data_dir)})
    worker = TrialWorker(config.model_dump(mode="json"))
    yield worker
    worker.close()


def state_of(worker: TrialWorker) -> tuple[list[str | None], float]:
    scores = worker.ce_scorer.score_references(PROMPTS, ["I cannot help with that."] * len(PROMPTS))
    return worker.generator.chat(user_turns(PROMPTS)).texts, scores.mean_nll


@pytest.mark.vllm
def test_a_streamed_merge_reaches_both_engines_exactly(worker, tmp_path):
    worker.load(GOOD)
    streamed = state_of(worker)
    expected = worker.merge_engine.merge(parse_recipe(GOOD))
    hf_state = worker.ce_scorer.model.state_dict()
    for name, tensor in expected.items():
        if name in hf_state:
            assert torch.equal(hf_state[name], tensor), name
    # The same merge from a saved folder, through a fresh transformers model, scores the same.
    folder = worker.save(GOOD, str(tmp_path / "merged"))
    from safemerge.evaluators.generation import HFGenerator

    fresh = HFGenerator(Path(folder))
    fresh_nll = fresh.score_references(PROMPTS, ["I cannot help with that."] * len(PROMPTS)).mean_nll
    assert fresh_nll == pytest.approx(streamed[1], rel=1e-6)


@pytest.mark.vllm
def test_a_merge_that_turns_bad_midway_leaves_the_engines_on_the_previous_weights(worker):
    worker.load(GOOD)
    before = state_of(worker)
    with pytest.raises(WeightsError, match="NaN or Inf") as error:
        worker.load(BAD)
    assert "layers." in str(error.value)  # it failed on a layer after some tensors had reached the engines
    assert state_of(worker) == before
    worker.load(GOOD)  # and the worker takes the next recipe
    assert state_of(worker) == before
