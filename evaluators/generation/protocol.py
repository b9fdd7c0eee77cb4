"""The backend-independent half of generation: the backend interface, its result types, prompt rendering and
fitting, weight checks, and `open_backend`."""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from safemerge.errors import UserError
from safemerge.weights import weight_files

Conversation = list[dict[str, str]]
PromptIds = list[tuple[int, list[int]]]  # (conversation index, prompt token ids)
ReferenceSpans = list[tuple[int, int, list[int]]]  # (pair index, prompt length, prompt + reference token ids)


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

    def load_weights(self, tensors: Weights) -> None: ...

    def chat(
        self,
        conversations: Sequence[Conversation],
        max_tokens: int = 64,
        temperature: float = 0.0,
        seed: int | None = None,
    ) -> Generations: ...

    def score_references(self, prompts: Sequence[str], references: Sequence[str]) -> ReferenceScores: ...

    def score_continuations(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[float | None]: ...

    def close(self) -> None: ...


def check_model_dir(model_dir: Path) -> Path:
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir} is not a model folder (no config.json); pass a Hugging Face model folder")
    return model_dir


def checkpoint_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a safetensors checkpoint, read from the file headers (no tensor is loaded)."""
    from safetensors import safe_open

    shapes = {}
    for path in weight_files(model_dir, f"model {str(model_dir)!r}", safetensors_only=True):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                shapes[name] = tuple(handle.get_slice(name).get_shape())
    return shapes


Weights = Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]


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
        _check_tensor(name, tensor, expected, model)


def _check_tensor(name: str, tensor: torch.Tensor, expected: Mapping[str, tuple[int, ...]], model: str) -> None:
    if name not in expected:
        raise WeightsError(
            f"merged tensors do not fit {model}: unknown {[name]}; merge models of the same architecture as the "
            "engine's"
        )
    if tuple(tensor.shape) != expected[name]:
        raise WeightsError(f"merged tensor {name} has shape {tuple(tensor.shape)}; {model} expects {expected[name]}")
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise WeightsError(f"merged tensor {name} holds NaN or Inf values; this recipe cannot be evaluated")


def checked_weights(
    tensors: Weights, expected: Mapping[str, tuple[int, ...]], model: str
) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors as a stream, each checked (name, shape, finite values) as it passes; a mapping is checked whole
    before its first tensor passes, so a bad one changes nothing. A stream that turns out bad raises WeightsError
    midway: the consumer then holds part of it, and whoever streamed it puts the previous weights back."""
    if isinstance(tensors, Mapping):
        validate_weights(tensors, expected, model)  # now, before the consumer has begun to take any
        return iter(tensors.items())
    return _checked_stream(tensors, expected, model)


def _checked_stream(
    tensors: Iterable[tuple[str, torch.Tensor]], expected: Mapping[str, tuple[int, ...]], model: str
) -> Iterator[tuple[str, torch.Tensor]]:
    seen = set()
    for name, tensor in tensors:
        _check_tensor(name, tensor, expected, model)
        seen.add(name)
        yield name, tensor
    missing = sorted(set(expected) - seen)
    if missing:
        raise WeightsError(
            f"merged tensors do not fit {model}: missing {missing[:3]}{' ...' if len(missing) > 3 else ''}; merge "
            "models of the same architecture as the engine's"
        )


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

    def continuation_ids(self, continuation: str) -> list[int]:
        return self.tokenizer(continuation, add_special_tokens=False)["input_ids"]

    def reference_ids(self, reference: str) -> list[int]:
        """A whole reference answer: its tokens, then the end of sequence the model must also predict."""
        return self.continuation_ids(reference) + [self.eos_id]

    def fits(self, prompt_ids: Sequence[int], new_tokens: int = 1) -> bool:
        return len(prompt_ids) + new_tokens <= self.max_model_len

    def encode_prompts(self, conversations: Sequence[Conversation]) -> tuple[PromptIds, int]:
        """(index, prompt ids) of every conversation that fits the context, and how many did not."""
        fitting = [(index, self.prompt_ids(conversation)) for index, conversation in enumerate(conversations)]
        kept = [(index, ids) for index, ids in fitting if self.fits(ids)]
        return kept, len(fitting) - len(kept)

    def encode_references(
        self, prompts: Sequence[str], references: Sequence[str], end_of_sequence: bool = True
    ) -> tuple[ReferenceSpans, int]:
        """(index, prompt length, prompt + reference ids) of every pair that fits, and how many did not. Each
        prompt is one user turn in the chat template, each reference the assistant's answer; `end_of_sequence`
        appends the eos token (a whole answer, for the cross-entropies), without it a choice is scored alone (the
        multiple-choice log-likelihoods, as lm-eval-harness scores a continuation)."""
        encode = self.reference_ids if end_of_sequence else self.continuation_ids
        kept = []
        for index, (prompt, reference) in enumerate(zip(prompts, references, strict=True)):
            prompt_ids = self.prompt_ids([{"role": "user", "content": prompt}])
            ids = prompt_ids + encode(reference)
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


class TokenizedBackend(ABC):
    """What every backend shares: it renders and fits prompts with one ChatTokenizer (a prompt too long for the
    context is skipped and counted, never a crash) and files the model's answers into the result types; a
    subclass only runs the model on the prompts that fit."""

    def __init__(self, model_dir: Path, max_model_len: int) -> None:
        self.model_dir = check_model_dir(model_dir)
        self.max_model_len = max_model_len
        self.chat_tokenizer = ChatTokenizer(self.model_dir, max_model_len)
        self.expected_shapes = checkpoint_shapes(self.model_dir)

    @abstractmethod
    def load_weights(self, tensors: Weights) -> None:
        """Swap in a full set of checkpoint-format tensors: a mapping, or a stream taken one tensor at a time."""

    @abstractmethod
    def generate_answers(
        self, prompts: PromptIds, max_tokens: int, temperature: float, seed: int | None
    ) -> list[tuple[str, int]]:
        """(answer text, generated token count) for each prompt, in order; a `seed` makes sampling repeatable."""

    @abstractmethod
    def reference_nlls(self, spans: ReferenceSpans) -> list[float]:
        """Summed negative log-likelihood of each span's reference tokens after its prompt, in order."""

    @abstractmethod
    def close(self) -> None: ...

    def chat(
        self,
        conversations: Sequence[Conversation],
        max_tokens: int = 64,
        temperature: float = 0.0,
        seed: int | None = None,
    ) -> Generations:
        prompts, skipped = self.chat_tokenizer.encode_prompts(conversations)
        result = Generations(texts=[None] * len(conversations), skipped=skipped)
        answers = self.generate_answers(prompts, max_tokens, temperature, seed)
        for (index, _), (text, tokens) in zip(prompts, answers, strict=True):
            result.texts[index] = text
            result.generated_tokens += tokens
        return result

    def score_references(self, prompts: Sequence[str], references: Sequence[str]) -> ReferenceScores:
        """Teacher-forced NLL of each reference answer (ending in eos) after its prompt."""
        spans, skipped = self.chat_tokenizer.encode_references(prompts, references)
        scores = ReferenceScores(per_item=[None] * len(prompts), skipped=skipped)
        for (index, start, ids), nll in zip(spans, self.reference_nlls(spans), strict=True):
            scores.per_item[index] = nll / (len(ids) - start)
            scores.total_nll += nll
            scores.tokens += len(ids) - start
        return scores

    def score_continuations(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[float | None]:
        """The summed log-likelihood of each continuation (no eos appended) as the assistant's answer to its
        prompt, as lm-eval-harness's `loglikelihood` requests; `None` for a pair that does not fit the context.
        All pairs go to the model in one batched call (a question's choices share its prompt's prefix)."""
        spans, _ = self.chat_tokenizer.encode_references(prompts, continuations, end_of_sequence=False)
        loglikelihoods: list[float | None] = [None] * len(prompts)
        for (index, _, _), nll in zip(spans, self.reference_nlls(spans), strict=True):
            loglikelihoods[index] = -nll
        return loglikelihoods


def open_backend(name: str, model_dir: Path, **options) -> GenerationBackend:
    """Start backend `name` ("vllm" or "hf") over a model folder; `options` go to its constructor."""
    # Imported here: the backends build on this module.
    from safemerge.evaluators.generation.hf_backend import HFGenerator
    from safemerge.evaluators.generation.vllm_backend import VLLMGenerator

    backends = {"vllm": VLLMGenerator, "hf": HFGenerator}
    if name not in backends:
        raise UserError(f"unknown backend {name!r}; choose one of {sorted(backends)}")
    return backends[name](model_dir, **options)
