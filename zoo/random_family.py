"""A Llama-shaped family of random weights: a base and fine-tunes of it (base plus small random deltas).

For the merge benchmarks and the merge engine's device tests, where what the weights say does not matter and
training them (the zoo) would only cost time."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int

    def config(self) -> dict:
        """The folder's config.json: an untied fp32 LlamaForCausalLM of this shape."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.heads,
            "vocab_size": self.vocab,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False,
            "dtype": "float32",
        }


def llama_tensors(shape: LlamaShape, generator: torch.Generator, scale: float) -> dict[str, torch.Tensor]:
    """Every tensor of a Llama checkpoint of `shape`, normal with standard deviation `scale`."""
    hidden, intermediate, vocab = shape.hidden, shape.intermediate, shape.vocab
    shapes = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    for layer in range(shape.layers):
        prefix = f"model.layers.{layer}."
        shapes.update(
            {
                prefix + "input_layernorm.weight": (hidden,),
                prefix + "post_attention_layernorm.weight": (hidden,),
                **{prefix + f"self_attn.{p}_proj.weight": (hidden, hidden) for p in "qkvo"},
                prefix + "mlp.gate_proj.weight": (intermediate, hidden),
                prefix + "mlp.up_proj.weight": (intermediate, hidden),
                prefix + "mlp.down_proj.weight": (hidden, intermediate),
            }
        )
    return {name: torch.randn(size, generator=generator) * scale for name, size in shapes.items()}


def write_random_family(work: Path, shape: LlamaShape, experts: Sequence[str], seed: int = 0) -> dict[str, Path]:
    """Folders `base` (weights of scale 0.02) and one per expert (base plus a delta of scale 0.002) under `work`;
    returns name -> folder. Folders already written there are kept."""
    folders = {name: work / name for name in ("base", *experts)}
    if all((folder / "model.safetensors").is_file() for folder in folders.values()):
        return folders
    generator = torch.Generator().manual_seed(seed)
    base = llama_tensors(shape, generator, 0.02)
    for name, folder in folders.items():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(shape.config(), indent=2))
        if name == "base":
            tensors = base
        else:
            deltas = llama_tensors(shape, generator, 0.002).values()
            tensors = {key: value + delta for (key, value), delta in zip(base.items(), deltas, strict=True)}
        save_file(tensors, str(folder / "model.safetensors"))
    return folders
