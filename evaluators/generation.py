"""Generation backends: chat prompts in, greedy answers out.

`VLLMGenerator` holds one vLLM engine for the life of a worker (an engine start costs about 24 s on the
CPU); the chat template of the model folder is applied, so a guard model's template formats its own
(prompt, response) pairs just as a real Llama Guard folder does.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from common.errors import UserError

Conversation = list[dict[str, str]]


def _check_model_dir(model_dir: Path) -> Path:
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir} is not a model folder (no config.json); pass a Hugging Face model folder")
    return model_dir


class VLLMGenerator:
    """A running vLLM engine over one model folder, generating greedily by default."""

    def __init__(
        self,
        model_dir: Path,
        max_model_len: int = 512,
        seed: int = 0,
        dtype: str = "float32",
        kv_cache_gib: int = 1,
        **engine_options,
    ) -> None:
        self.model_dir = _check_model_dir(model_dir)
        # The CPU build sizes its KV cache from this variable; 1 GiB holds thousands of zoo sequences.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
        from vllm import LLM  # imported late: importing vLLM costs seconds and starts nothing

        self.max_model_len = max_model_len
        self.llm = LLM(model=str(self.model_dir), dtype=dtype, max_model_len=max_model_len, seed=seed, **engine_options)

    def chat(self, conversations: Sequence[Conversation], max_tokens: int = 64, temperature: float = 0.0) -> list[str]:
        """One answer per conversation (each a list of {'role', 'content'} messages)."""
        from vllm import SamplingParams

        if not conversations:
            return []
        params = SamplingParams(temperature=temperature, max_tokens=max_tokens)
        outputs = self.llm.chat(list(conversations), params, use_tqdm=False)
        return [output.outputs[0].text for output in outputs]

    def answer(self, prompts: Sequence[str], max_tokens: int = 64) -> list[str]:
        """Greedy answers to single-turn user prompts."""
        return self.chat([[{"role": "user", "content": prompt}] for prompt in prompts], max_tokens=max_tokens)

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            shutdown = getattr(engine, "shutdown", None)
            if callable(shutdown):
                shutdown()
            self.llm = None
