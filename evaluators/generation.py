"""Generation backends behind one small interface: load tensors in place, generate for chat prompts,
and score reference answers (teacher-forced log-probabilities).

`VLLMGenerator` keeps one vLLM engine for the life of a worker (an engine start costs about 24 s on the
CPU) and swaps merged weights into it with `reload_weights`, then resets the prefix cache. It runs the
engine in the caller's process (no engine-core subprocess), so the weights reach the model by reference
instead of being serialized. `HFGenerator` is the transformers fallback and the reference.
Both render prompts with the model folder's chat template and tokenize them the same way, so a prompt too
long for the context is skipped and counted by both, never a crash.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from safemerge.errors import UserError

Conversation = list[dict[str, str]]


def user_turns(prompts: Sequence[str]) -> list[Conversation]:
    """Single-turn conversations, one per prompt."""
    return [[{"role": "user", "content": prompt}] for prompt in prompts]


class WeightsError(ValueError):
    """Merged tensors that do not fit the engine's model (names, shapes, NaN/Inf): that trial fails, the
    engine keeps its previous weights and takes the next one."""


@dataclass
class Generations:
    """Answers in prompt order; `None` where the prompt did not fit the context (counted in `skipped`)."""

    texts: list[str | None]
    skipped: int = 0
    generated_tokens: int = 0

    def answered(self) -> list[tuple[int, str]]:
        return [(index, text) for index, text in enumerate(self.texts) if text is not None]


@dataclass
class ReferenceScores:
    """Teacher-forced negative log-likelihood of reference answers, summed and per token."""

    total_nll: float = 0.0
    tokens: int = 0
    skipped: int = 0
    per_item: list[float | None] = field(default_factory=list)

    @property
    def mean_nll(self) -> float:
        return self.total_nll / self.tokens if self.tokens else math.nan


class GenerationBackend(Protocol):
    model_dir: Path
    max_model_len: int

    def load_weights(self, tensors: Mapping[str, torch.Tensor]) -> None: ...

    def chat(
        self,
        conversations: Sequence[Conversation],
        max_tokens: int = 64,
        temperature: float = 0.0,
        seed: int | None = None,
    ) -> Generations: ...

    def score_references(self, prompts: Sequence[str], references: Sequence[str]) -> ReferenceScores: ...

    def close(self) -> None: ...


def check_model_dir(model_dir: Path) -> Path:
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir} is not a model folder (no config.json); pass a Hugging Face model folder")
    return model_dir


def checkpoint_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a safetensors checkpoint, read from the file headers (no tensor is loaded)."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise UserError(f"{model_dir} has no .safetensors files; save the model with safe_serialization=True")
    shapes = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                shapes[name] = tuple(handle.get_slice(name).get_shape())
    return shapes


def validate_weights(tensors: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]], model: str) -> None:
    """Raise WeightsError naming the first tensor whose name, shape or values do not fit `model`."""
    missing = sorted(set(expected) - set(tensors))
    unknown = sorted(set(tensors) - set(expected))
    if missing or unknown:
        raise WeightsError(
            f"merged tensors do not fit {model}: "
            + (f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''} " if missing else "")
            + (f"unknown {unknown[:3]}{' ...' if len(unknown) > 3 else ''}" if unknown else "")
            + "; merge models of the same architecture as the engine's"
        )
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != expected[name]:
            raise WeightsError(
                f"merged tensor {name} has shape {tuple(tensor.shape)}; {model} expects {expected[name]}"
            )
        if not torch.isfinite(tensor).all():
            raise WeightsError(f"merged tensor {name} holds NaN or Inf values; this recipe cannot be evaluated")


class ChatTokenizer:
    """Renders conversations with the folder's chat template and tokenizes them once, for every backend."""

    def __init__(self, model_dir: Path, max_model_len: int) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        if self.tokenizer.chat_template is None:
            raise UserError(f"{model_dir} has no chat template; add one to its tokenizer_config.json")
        self.max_model_len = max_model_len
        self.eos_id = _generation_eos_id(model_dir, self.tokenizer)
        self._prompt_cache: dict[tuple, list[int]] = {}

    def prompt_ids(self, conversation: Conversation) -> list[int]:
        # A search scores the same prompts every trial: render and tokenize each conversation once.
        key = tuple((message["role"], message["content"]) for message in conversation)
        cached = self._prompt_cache.get(key)
        if cached is None:
            text = self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
            cached = self._prompt_cache[key] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return list(cached)

    def reference_ids(self, reference: str) -> list[int]:
        return self.tokenizer(reference, add_special_tokens=False)["input_ids"] + [self.eos_id]

    def fits(self, prompt_ids: Sequence[int], new_tokens: int = 1) -> bool:
        return len(prompt_ids) + new_tokens <= self.max_model_len

    def encode_prompts(self, conversations: Sequence[Conversation]) -> tuple[list[tuple[int, list[int]]], int]:
        """(index, prompt ids) of every conversation that fits the context, and how many did not."""
        fitting = [(index, self.prompt_ids(conversation)) for index, conversation in enumerate(conversations)]
        kept = [(index, ids) for index, ids in fitting if self.fits(ids)]
        return kept, len(fitting) - len(kept)

    def encode_references(
        self, prompts: Sequence[str], references: Sequence[str]
    ) -> tuple[list[tuple[int, int, list[int]]], int]:
        """(index, prompt length, prompt + reference ids) of every pair that fits, and how many did not."""
        kept = []
        for index, (prompt, reference) in enumerate(zip(prompts, references, strict=True)):
            prompt_ids = self.prompt_ids([{"role": "user", "content": prompt}])
            ids = prompt_ids + self.reference_ids(reference)
            if self.fits(ids):  # vLLM needs room for one generated token even when scoring
                kept.append((index, len(prompt_ids), ids))
        return kept, len(prompts) - len(kept)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def _generation_eos_id(model_dir: Path, tokenizer) -> int:
    """The id generation stops at: generation_config's eos (first, if a list), else the tokenizer's."""
    config_path = Path(model_dir) / "generation_config.json"
    if config_path.is_file():
        eos = json.loads(config_path.read_text()).get("eos_token_id")
        if isinstance(eos, list) and eos:
            return int(eos[0])
        if isinstance(eos, int):
            return eos
    return int(tokenizer.eos_token_id)


class VLLMGenerator:
    """One vLLM engine over a model folder, in this process; greedy decoding; weights swapped in place."""

    def __init__(
        self,
        model_dir: Path,
        max_model_len: int = 512,
        seed: int = 0,
        dtype: str = "float32",
        kv_cache_gib: int = 1,
        **engine_options,
    ) -> None:
        self.model_dir = check_model_dir(model_dir)
        self.max_model_len = max_model_len
        self.chat_tokenizer = ChatTokenizer(self.model_dir, max_model_len)
        self.expected_shapes = checkpoint_shapes(self.model_dir)
        # In-process engine core and executor: no subprocess, weights handed over by reference.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        # The CPU build sizes its KV cache from this variable; 1 GiB holds thousands of zoo sequences.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
        from vllm import LLM  # imported late: importing vLLM costs seconds

        engine_options.setdefault("distributed_executor_backend", "uni")
        _LIVE_ENGINES.add(id(self))
        self.llm = LLM(model=str(self.model_dir), dtype=dtype, max_model_len=max_model_len, seed=seed, **engine_options)

    def load_weights(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Swap a full set of checkpoint-format tensors into the running engine, then drop cached prefixes."""
        validate_weights(tensors, self.expected_shapes, str(self.model_dir))
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(tensors.items())})
        self.llm.reset_prefix_cache()

    def chat(
        self,
        conversations: Sequence[Conversation],
        max_tokens: int = 64,
        temperature: float = 0.0,
        seed: int | None = None,
    ) -> Generations:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        pending, skipped = self.chat_tokenizer.encode_prompts(conversations)
        result = Generations(texts=[None] * len(conversations), skipped=skipped)
        prompts = [TokensPrompt(prompt_token_ids=ids) for _, ids in pending]
        params = [
            SamplingParams(
                temperature=temperature,
                max_tokens=min(max_tokens, self.max_model_len - len(ids)),
                seed=None if seed is None else seed + index,
            )
            for index, ids in pending
        ]
        if prompts:
            for (index, _), output in zip(pending, self.llm.generate(prompts, params, use_tqdm=False), strict=True):
                result.texts[index] = output.outputs[0].text
                result.generated_tokens += len(output.outputs[0].token_ids)
        return result

    def score_references(self, prompts: Sequence[str], references: Sequence[str]) -> ReferenceScores:
        """Teacher-forced NLL of each reference answer after its prompt, from vLLM's prompt log-probs."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        spans, skipped = self.chat_tokenizer.encode_references(prompts, references)
        scores = ReferenceScores(per_item=[None] * len(prompts), skipped=skipped)
        requests = [TokensPrompt(prompt_token_ids=ids) for _, _, ids in spans]
        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
        outputs = self.llm.generate(requests, params, use_tqdm=False) if requests else []
        for (index, start, ids), output in zip(spans, outputs, strict=True):
            logprobs = output.prompt_logprobs
            nll = -sum(logprobs[position][ids[position]].logprob for position in range(start, len(ids)))
            scores.per_item[index] = nll / (len(ids) - start)
            scores.total_nll += nll
            scores.tokens += len(ids) - start
        return scores

    def close(self) -> None:
        """Release the engine. In-process engines share vLLM's process-wide distributed state, and an engine's
        shutdown tears it down for all of them; so while other engines of this process are alive, the engine is
        dropped without its shutdown (its memory stays until the process ends), and the last one shuts down."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        _LIVE_ENGINES.discard(id(self))
        finalizer = getattr(getattr(llm.llm_engine, "engine_core", None), "_finalizer", None)
        if finalizer is not None:
            if _LIVE_ENGINES:
                finalizer.detach()
            else:
                finalizer()


_LIVE_ENGINES: set[int] = set()  # in-process VLLMGenerators not yet closed


class HFGenerator:
    """The transformers backend: the same interface, batched greedy decoding with left padding."""

    def __init__(
        self,
        model_dir: Path,
        max_model_len: int = 512,
        batch_size: int = 64,
        dtype: str = "float32",
        device: str | None = None,
    ) -> None:
        from transformers import AutoModelForCausalLM

        self.model_dir = check_model_dir(model_dir)
        self.max_model_len = max_model_len
        self.batch_size = batch_size
        self.chat_tokenizer = ChatTokenizer(self.model_dir, max_model_len)
        self.expected_shapes = checkpoint_shapes(self.model_dir)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = AutoModelForCausalLM.from_pretrained(str(self.model_dir), dtype=getattr(torch, dtype))
        self.model.to(self.device).eval()

    def load_weights(self, tensors: Mapping[str, torch.Tensor]) -> None:
        validate_weights(tensors, self.expected_shapes, str(self.model_dir))
        state = self.model.state_dict()
        with torch.no_grad():
            for name, tensor in tensors.items():
                if name in state:  # a tied lm_head is not a separate parameter here
                    state[name].copy_(tensor.to(state[name].dtype))

    def _padded(self, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        pad_id = self.chat_tokenizer.tokenizer.pad_token_id or self.chat_tokenizer.eos_id
        width = max(len(row) for row in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row_index, row in enumerate(rows):
            ids[row_index, width - len(row) :] = torch.tensor(row)
            mask[row_index, width - len(row) :] = 1
        return ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def chat(
        self,
        conversations: Sequence[Conversation],
        max_tokens: int = 64,
        temperature: float = 0.0,
        seed: int | None = None,
    ) -> Generations:
        pending, skipped = self.chat_tokenizer.encode_prompts(conversations)
        result = Generations(texts=[None] * len(conversations), skipped=skipped)
        if seed is not None:
            torch.manual_seed(seed)
        for start in range(0, len(pending), self.batch_size):
            batch = pending[start : start + self.batch_size]
            ids, mask = self._padded([row for _, row in batch])
            budget = min(max_tokens, self.max_model_len - ids.shape[1])
            out = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=budget,
                do_sample=temperature > 0,
                temperature=temperature if temperature > 0 else None,
                eos_token_id=self.chat_tokenizer.eos_id,
                pad_token_id=self.chat_tokenizer.tokenizer.pad_token_id,
            )
            for (index, _), row in zip(batch, out[:, ids.shape[1] :].tolist(), strict=True):
                if self.chat_tokenizer.eos_id in row:
                    row = row[: row.index(self.chat_tokenizer.eos_id) + 1]
                result.texts[index] = self.chat_tokenizer.decode(row)
                result.generated_tokens += len(row)
        return result

    @torch.no_grad()
    def score_references(self, prompts: Sequence[str], references: Sequence[str]) -> ReferenceScores:
        pending, skipped = self.chat_tokenizer.encode_references(prompts, references)
        scores = ReferenceScores(per_item=[None] * len(prompts), skipped=skipped)
        for start in range(0, len(pending), self.batch_size):
            batch = pending[start : start + self.batch_size]
            ids, mask = self._padded([row for _, _, row in batch])
            positions_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)  # left padding must not shift positions
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions_ids).logits
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            width = ids.shape[1]
            for row_index, (index, prompt_len, row) in enumerate(batch):
                offset = width - len(row)  # left padding
                targets = torch.tensor(row[prompt_len:], device=self.device)
                positions = torch.arange(offset + prompt_len - 1, offset + len(row) - 1, device=self.device)
                nll = -logprobs[row_index, positions, targets].sum().item()
                scores.per_item[index] = nll / len(targets)
                scores.total_nll += nll
                scores.tokens += len(targets)
        return scores

    def close(self) -> None:
        self.model = None


BACKENDS = {"vllm": VLLMGenerator, "hf": HFGenerator}


def open_backend(name: str, model_dir: Path, **options) -> GenerationBackend:
    if name not in BACKENDS:
        raise UserError(f"unknown backend {name!r}; choose one of {sorted(BACKENDS)}")
    return BACKENDS[name](model_dir, **options)
