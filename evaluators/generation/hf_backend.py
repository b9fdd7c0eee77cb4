"""The transformers backend: the fallback and the reference for the vLLM one, with batched decoding."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from safemerge.evaluators.generation.protocol import (
    PromptIds,
    ReferenceSpans,
    TokenizedBackend,
    Weights,
    checked_weights,
)


class HFGenerator(TokenizedBackend):
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

        super().__init__(model_dir, max_model_len)
        self.batch_size = batch_size
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = AutoModelForCausalLM.from_pretrained(str(self.model_dir), dtype=getattr(torch, dtype))
        self.model.to(self.device).eval()

    def load_weights(self, tensors: Weights) -> None:
        for _ in self.copy_through(tensors):
            pass

    def copy_through(self, tensors: Weights) -> Iterator[tuple[str, torch.Tensor]]:
        """Copy each checked tensor into this model's weights as it passes, and pass it on: one merge streamed
        into two engines (this cross-entropy scorer and the generator) without holding it."""
        state = self.model.state_dict()
        with torch.no_grad():
            for name, tensor in checked_weights(tensors, self.expected_shapes, str(self.model_dir)):
                if name in state:  # a tied lm_head is not a separate parameter here
                    state[name].copy_(tensor.to(state[name].dtype))
                yield name, tensor

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
    def generate_answers(
        self, prompts: PromptIds, max_tokens: int, temperature: float, seed: int | None
    ) -> list[tuple[str, int]]:
        if seed is not None:
            torch.manual_seed(seed)
        answers = []
        for start in range(0, len(prompts), self.batch_size):
            batch = prompts[start : start + self.batch_size]
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
            for row in out[:, ids.shape[1] :].tolist():
                if self.chat_tokenizer.eos_id in row:
                    row = row[: row.index(self.chat_tokenizer.eos_id) + 1]
                answers.append((self.chat_tokenizer.decode(row), len(row)))
        return answers

    @torch.no_grad()
    def reference_nlls(self, spans: ReferenceSpans) -> list[float]:
        nlls = []
        for start in range(0, len(spans), self.batch_size):
            batch = spans[start : start + self.batch_size]
            ids, mask = self._padded([row for _, _, row in batch])
            positions_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)  # left padding must not shift positions
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions_ids).logits
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            width = ids.shape[1]
            for row_index, (_, prompt_len, row) in enumerate(batch):
                offset = width - len(row)  # left padding
                targets = torch.tensor(row[prompt_len:], device=self.device)
                positions = torch.arange(offset + prompt_len - 1, offset + len(row) - 1, device=self.device)
                nlls.append(-logprobs[row_index, positions, targets].sum().item())
        return nlls

    def close(self) -> None:
        self.model = None
