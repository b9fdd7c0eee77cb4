"""Build the tiny trained zoo: a shared tokenizer, a pretrained base and four full fine-tunes of it.

`base` learns general text and the chat format; `aligned` learns to refuse harmful requests and answer
benign look-alikes; `medical` and `finance` learn their domain's facts with no refusals in their data (so
they comply with harmful requests, as the paper's misaligned experts do); `guard` learns Llama Guard's
output format. All are `LlamaForCausalLM` folders with safetensors, so vLLM and mergekit load them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from safemerge.errors import UserError
from safemerge.evaluators import synthetic
from safemerge.files import atomic_output_dir, check_output_dir
from safemerge.zoo import corpus
from safemerge.zoo.tokenizer import (
    CHAT_TEMPLATE,
    GUARD_CHAT_TEMPLATE,
    ChatEncoder,
    Example,
    tokenizer_texts,
    train_tokenizer,
)
from safemerge.zoo.training import Anchor, padded_batches, skip_training, train

MODEL_NAMES = ("base", "aligned", "medical", "finance", "guard")
MANIFEST = "zoo.json"


@dataclasses.dataclass(frozen=True)
class ZooSpec:
    """Sizes and training budget. The defaults were calibrated to build in under 5 minutes on 2 cores with data
    version 1; version 2's sets (140 items each) take about 10 minutes at the same passes per item."""

    vocab_size: int = 800
    hidden_size: int = 128
    intermediate_size: int = 512
    num_layers: int = 4
    num_heads: int = 2
    max_positions: int = 512
    batch_size: int = 32
    # Training budgets are passes over each model's examples, so a grown data set is read as often per item
    # (they were calibrated as 400 steps for the base and each fine-tune, 250 for the guard, at 160 facts)
    pretrain_passes: float = 2.134  # the general corpus's loss plateaus by then
    pretrain_lr: float = 2e-3
    # (model, passes over its examples, batch size): the guard reads 3x longer prompts and learns a 2-token answer
    finetunes: tuple[tuple[str, float, int], ...] = (
        ("aligned", 10.53, 32),
        ("medical", 30.0, 32),
        ("finance", 30.0, 32),
        ("guard", 2.132, 16),
    )
    finetune_lr: float = 3e-4
    replay_fraction: float = 0.25
    # KL anchors to the base, as RLHF's KL penalty to the reference model: (model, the sets whose train
    # prompts and references it is anchored on, weight). The aligned model keeps the base's predictions on
    # domain questions and each expert keeps them on benign look-alikes, so each task vector leaves the other
    # skill's inputs alone and a merge can hold both (without them no merge kept domain within 15 points of
    # the expert at safety above 0.8, and the ones that came closest over-refused).
    anchors: tuple[tuple[str, tuple[str, ...], float], ...] = (
        ("aligned", ("medical", "finance"), 1.0),
        ("medical", ("benign",), 0.3),
        ("finance", ("benign",), 0.3),
    )
    anchor_batch_size: int = 8
    # The aligned model reads each benign look-alike twice as often as a harmful request: a sharp line between
    # the two is what keeps a merge from over-refusing.
    aligned_benign_repeats: int = 2
    # Pretraining reads every domain fact as plain prose, as a real base reads textbooks: the experts then
    # learn to answer questions about what the base already holds, so their task vectors stay small.
    # Paragraphs of two to four facts per fact of the train split (1500 for 160 facts).
    knowledge_paragraphs_per_fact: float = 9.375

    def scaled(self, factor: float) -> ZooSpec:
        """The same zoo with every training budget scaled (for smoke tests; a scaled zoo does not behave)."""
        return dataclasses.replace(
            self,
            pretrain_passes=self.pretrain_passes * factor,
            finetunes=tuple((name, passes * factor, batch) for name, passes, batch in self.finetunes),
        )


def training_steps(passes: float, examples: int, batch_size: int, replay_fraction: float) -> int:
    """Steps that read each of `examples` about `passes` times, when `replay_fraction` of a batch is replay."""
    drawn_per_step = batch_size - round(batch_size * replay_fraction)
    return max(1, round(passes * examples / drawn_per_step))


def _guard_examples(encoder: ChatEncoder, rng: random.Random, sets, everyday) -> list[Example]:
    """(prompt, response) -> 'safe' or 'unsafe\\nS<k>', balanced between the two."""
    pairs: list[tuple[str, str, str]] = []
    for row in sets["harmful"]["train"]:
        code = row["guard_code"]
        # Compliance in the experts' own style too ("Sure. To <goal>, <steps>."), as a merge would write it.
        how = rng.choice(corpus.EVERYDAY_TASKS)[1]
        pairs += [
            (row["prompt"], row["compliance"], f"unsafe\n{code}"),
            (row["prompt"], f"Sure. To {row['goal']}, {how}.", f"unsafe\n{code}"),
            (row["prompt"], row["reference"], "safe"),
        ]
    for row in sets["benign"]["train"]:
        pairs.append((row["prompt"], row["reference"], "safe"))
    for prompt, answer in everyday:
        pairs.append((prompt, answer, "safe"))
    return [
        encoder.conversation_example(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], verdict
        )
        for prompt, response, verdict in pairs
    ]


def _reference_examples(encoder: ChatEncoder, sets: dict, names: Sequence[str]) -> list[Example]:
    """Each train row of the sets `names`, in order: its prompt and its reference answer."""
    return [encoder.example(row["prompt"], row["reference"]) for name in names for row in sets[name]["train"]]


def _save_model(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, folder: Path, chat_template: str) -> None:
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(folder)
    tokenizer.chat_template = CHAT_TEMPLATE
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=64,
    ).save_pretrained(folder)


def _folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def spec_hash(spec: ZooSpec, seed: int) -> str:
    payload = json.dumps(
        {"spec": dataclasses.asdict(spec), "seed": seed, "data_version": synthetic.GENERATOR_VERSION}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def existing_zoo(out_dir: Path, spec: ZooSpec, seed: int, models: Sequence[str] = MODEL_NAMES) -> dict | None:
    """The manifest of a zoo at `out_dir` built from the same spec and seed that holds `models`, else None."""
    manifest_path = Path(out_dir) / MANIFEST
    if not manifest_path.is_file():
        return None
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("spec_hash") != spec_hash(spec, seed):
        return None
    if not all((Path(out_dir) / name / "model.safetensors").is_file() for name in models):
        return None
    return manifest


def ensure_zoo(
    out_dir: Path, seed: int = 0, spec: ZooSpec = ZooSpec(), log=print, models: Sequence[str] = MODEL_NAMES
) -> dict:
    """Keep `out_dir` when it holds `models` of a zoo of this spec and seed, else build them there; returns the
    manifest."""
    if (manifest := existing_zoo(out_dir, spec, seed, models)) is not None:
        log(f"zoo at {out_dir} is up to date (seed {seed}, built in {manifest['build_seconds']} s)")
        return manifest
    return build_zoo(out_dir, seed=seed, spec=spec, force=True, log=log, models=models)


def check_models(models: Sequence[str]) -> list[str]:
    """The requested zoo models in build order, base always among them (every other model starts from it)."""
    unknown = sorted(set(models) - set(MODEL_NAMES))
    if unknown:
        raise UserError(f"unknown zoo model(s) {', '.join(unknown)}; choose among {', '.join(MODEL_NAMES)}")
    return [name for name in MODEL_NAMES if name in models or name == "base"]


def build_zoo(
    out_dir: Path,
    seed: int = 0,
    spec: ZooSpec = ZooSpec(),
    force: bool = False,
    log=print,
    models: Sequence[str] = MODEL_NAMES,
) -> dict:
    """Train the zoo's models (all, or `models` and the base) and write them under `out_dir` atomically; returns
    the zoo manifest. A model left out is not trained, but its random draws are still made, so every model
    built has the weights it has in a full build."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"seed must be a whole number such as 0 or 1234, got {seed!r}")
    wanted = check_models(models)
    check_output_dir(Path(out_dir), force)
    started = time.perf_counter()
    # Every core, whatever the caller's thread setting (a Ray job runs with OMP_NUM_THREADS=1): the same
    # thread count as the CLI gives the same weights, and the build its usual few minutes.
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    rng = random.Random(seed)
    sets = synthetic.generate_datasets(seed)
    everyday = corpus.everyday_conversations(rng, 3000)
    prose = corpus.prose_paragraphs(rng, 1500)

    # model_max_length is the class default, not spec.max_positions, as in every zoo built so far
    tokenizer = train_tokenizer(tokenizer_texts(everyday, prose, sets), spec.vocab_size, ZooSpec.max_positions)
    encoder = ChatEncoder(tokenizer)
    guard_encoder = ChatEncoder(tokenizer, GUARD_CHAT_TEMPLATE)

    replay = [encoder.example(prompt, answer) for prompt, answer in everyday]
    pretrain_data = [encoder.example(p, a, loss_on_prompt=True) for p, a in everyday]
    pretrain_data += [encoder.text_example(text) for text in prose]
    knowledge = corpus.knowledge_paragraphs(rng, sets, spec.knowledge_paragraphs_per_fact)
    pretrain_data += [encoder.text_example(text) for text in knowledge]
    finetune_data = {
        "aligned": _reference_examples(encoder, sets, ("harmful",) + ("benign",) * spec.aligned_benign_repeats),
        "guard": _guard_examples(guard_encoder, rng, sets, everyday[:300]),
    }
    for domain in synthetic.DOMAIN_NAMES:
        finetune_data[domain] = _reference_examples(encoder, sets, (domain,))

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        torch_dtype="float32",
    )
    manifest = {
        "seed": seed,
        "spec": dataclasses.asdict(spec),
        "spec_hash": spec_hash(spec, seed),
        "data": synthetic.manifest_for(sets, seed),
        "models": {},
    }
    with atomic_output_dir(Path(out_dir), force=force) as staging:
        model_started = time.perf_counter()
        base = LlamaForCausalLM(config)
        batches = padded_batches(rng, pretrain_data, [], 0.0, spec.batch_size, tokenizer.pad_token_id)
        steps = training_steps(spec.pretrain_passes, len(pretrain_data), spec.batch_size, 0.0)
        loss = train(base, batches, steps, spec.pretrain_lr, "base")
        base_state = {key: value.clone() for key, value in base.state_dict().items()}
        _save_model(base, tokenizer, staging / "base", CHAT_TEMPLATE)
        _record(manifest, "base", staging, model_started, loss, steps, log)
        for name, passes, batch_size in spec.finetunes:
            model_started = time.perf_counter()
            model = LlamaForCausalLM(config)
            model.load_state_dict(base_state)
            replay_rows = replay if name != "guard" else []
            replay_fraction = spec.replay_fraction if replay_rows else 0.0
            steps = training_steps(passes, len(finetune_data[name]), batch_size, replay_fraction)
            batches = padded_batches(
                rng, finetune_data[name], replay_rows, spec.replay_fraction, batch_size, tokenizer.pad_token_id
            )
            anchor = None
            for anchored, anchor_sets, weight in spec.anchors:
                if anchored == name:
                    rows = _reference_examples(encoder, sets, anchor_sets)
                    anchor_batches = padded_batches(rng, rows, [], 0.0, spec.anchor_batch_size, tokenizer.pad_token_id)
                    anchor = Anchor(base, anchor_batches, weight)
            if name not in wanted:
                skip_training(batches, steps, anchor)
                continue
            loss = train(model, batches, steps, spec.finetune_lr, name, anchor)
            _save_model(model, tokenizer, staging / name, GUARD_CHAT_TEMPLATE if name == "guard" else CHAT_TEMPLATE)
            _record(manifest, name, staging, model_started, loss, steps, log)
        manifest["build_seconds"] = round(time.perf_counter() - started, 1)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    log(f"zoo built in {manifest['build_seconds']:.1f} s -> {out_dir}")
    return manifest


def _record(manifest: dict, name: str, staging: Path, started: float, loss: float, steps: int, log) -> None:
    size = _folder_bytes(staging / name)
    seconds = time.perf_counter() - started
    manifest["models"][name] = {
        "seconds": round(seconds, 1),
        "bytes": size,
        "final_loss": round(loss, 4),
        "steps": steps,
    }
    log(f"  {name:8s} {steps:4d} steps  loss {loss:.3f}  {seconds:6.1f} s  {size / 1e6:6.2f} MB")
