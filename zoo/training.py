"""The zoo's trainer: padded batches drawn with replay, the KL anchor to a frozen reference, and the AdamW loop
that trains the base and each fine-tune."""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Iterator

import torch
from tqdm.auto import tqdm
from transformers import LlamaForCausalLM

from safemerge.zoo.tokenizer import Example

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # input ids, attention mask, labels


def padded_batches(
    rng: random.Random,
    main: list[Example],
    replay: list[Example],
    replay_fraction: float,
    batch_size: int,
    pad_id: int,
) -> Iterator[Batch]:
    """Endless padded batches: each draws `replay_fraction` of its rows from `replay`, the rest from `main`."""
    n_replay = round(batch_size * replay_fraction) if replay else 0
    while True:
        rows = (
            rng.sample(main, batch_size - n_replay)
            if len(main) >= batch_size
            else [rng.choice(main) for _ in range(batch_size - n_replay)]
        )
        rows += [rng.choice(replay) for _ in range(n_replay)]
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for row, (ids, row_labels) in enumerate(rows):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(ids)] = torch.tensor(row_labels)
            attention[row, : len(ids)] = 1
        yield input_ids, attention, labels


@dataclasses.dataclass
class Anchor:
    """A KL penalty to a frozen reference model on batches of other data."""

    reference: LlamaForCausalLM
    batches: Iterator[Batch]
    weight: float

    def penalty(self, model: LlamaForCausalLM) -> torch.Tensor:
        """KL(reference || model) per labelled token, averaged."""
        input_ids, attention, labels = next(self.batches)
        with torch.no_grad():
            reference = torch.log_softmax(self.reference(input_ids=input_ids, attention_mask=attention).logits, -1)
        current = torch.log_softmax(model(input_ids=input_ids, attention_mask=attention).logits, -1)
        # position t predicts token t+1: the positions whose next token is labelled
        labelled = labels[:, 1:] != -100
        kl = (reference.exp() * (reference - current)).sum(-1)[:, :-1]
        return self.weight * kl[labelled].mean()


def train(
    model: LlamaForCausalLM,
    batches: Iterator[Batch],
    steps: int,
    lr: float,
    desc: str,
    anchor: Anchor | None = None,
) -> float:
    """AdamW with linear warm-up and cosine decay (plus the anchor's penalty, when given); returns the mean
    task loss of the last 20 steps."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    recent: list[float] = []
    progress = tqdm(range(steps), desc=desc, leave=False, mininterval=2.0)
    for _ in progress:
        input_ids, attention, labels = next(batches)
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        total = loss if anchor is None else loss + anchor.penalty(model)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        recent = (recent + [loss.item()])[-20:]
        progress.set_postfix(loss=f"{recent[-1]:.3f}", refresh=False)
    model.eval()
    return sum(recent) / len(recent)


def skip_training(batches: Iterator[Batch], steps: int, anchor: Anchor | None = None) -> None:
    """Draw the batches `train` would draw over `steps` steps, in its order, without training: a model left out
    of a build leaves the random state as its training would."""
    for _ in range(steps):
        next(batches)
        if anchor is not None:
            next(anchor.batches)
