"""Header-only stubs of real model families: each folder holds the real model's config.json and safetensors files
whose headers list every tensor (names, dtypes, shapes, offsets) and hold no data, so the memory plan can be
checked on Llama-3-8B and Llama-3-70B shapes in kilobytes. No engine can load them.

    python -m safemerge.zoo.stubs OUT     # writes OUT/<model>/ folders and OUT/llama3-8b.yaml, OUT/llama3-70b.yaml
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from safemerge.weights import SAFETENSORS_DTYPE_BYTES, SAFETENSORS_INDEX
from safemerge.zoo.random_family import LlamaShape

# config.json of the published models (Hugging Face hub), the fields that matter to loaders and to the plan.
_LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 8192,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.40.0.dev0",
    "use_cache": True,
    "vocab_size": 128256,
}
_LLAMA3_70B = {
    **_LLAMA3_8B,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_attention_heads": 64,
    "num_hidden_layers": 80,
}
_LLAMA_GUARD_3_8B = {
    **_LLAMA3_8B,
    "eos_token_id": 128009,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "rope_scaling": {
        "factor": 8.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "transformers_version": "4.43.0.dev0",
}

# folder name -> (config.json, number of safetensors shards), as published.
STUB_MODELS: dict[str, tuple[dict, int]] = {
    "Meta-Llama-3-8B": (_LLAMA3_8B, 4),
    "Meta-Llama-3-8B-Instruct": ({**_LLAMA3_8B, "eos_token_id": 128009}, 4),
    "Llama3-OpenBioLLM-8B": (_LLAMA3_8B, 4),
    "Llama-Guard-3-8B": (_LLAMA_GUARD_3_8B, 4),
    "Meta-Llama-3-70B": (_LLAMA3_70B, 30),
    "Meta-Llama-3-70B-Instruct": ({**_LLAMA3_70B, "eos_token_id": 128009}, 30),
    "Llama3-OpenBioLLM-70B": (_LLAMA3_70B, 30),
}
# family -> role -> folder name: configs/llama3-medical.yaml's models, at 8B and at 70B (judged by the 8B guard).
STUB_FAMILIES: dict[str, dict[str, str]] = {
    "llama3-8b": {
        "base": "Meta-Llama-3-8B",
        "aligned": "Meta-Llama-3-8B-Instruct",
        "medical": "Llama3-OpenBioLLM-8B",
        "guard": "Llama-Guard-3-8B",
    },
    "llama3-70b": {
        "base": "Meta-Llama-3-70B",
        "aligned": "Meta-Llama-3-70B-Instruct",
        "medical": "Llama3-OpenBioLLM-70B",
        "guard": "Llama-Guard-3-8B",
    },
}
_TORCH_TO_SAFETENSORS = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def write_header_stub(path: Path, tensors: Mapping[str, tuple[str, Sequence[int]]]) -> None:
    """A safetensors file with a valid header for `tensors` (name -> (safetensors dtype, shape)), in order, and
    no data after it."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        size = SAFETENSORS_DTYPE_BYTES[dtype]
        for dimension in shape:
            size *= dimension
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads its header to 8 bytes with spaces
    Path(path).write_bytes(struct.pack("<Q", len(raw)) + raw)


def config_shape(config: Mapping) -> LlamaShape:
    """The tensor layout of a Llama config.json (grouped-query attention, tied embeddings, checkpoint dtype)."""
    return LlamaShape(
        hidden=config["hidden_size"],
        intermediate=config["intermediate_size"],
        layers=config["num_hidden_layers"],
        heads=config["num_attention_heads"],
        vocab=config["vocab_size"],
        kv_heads=config.get("num_key_value_heads"),
        tie_embeddings=config.get("tie_word_embeddings", False),
        attention_bias=config.get("attention_bias", False),
        dtype=config.get("torch_dtype") or config.get("dtype") or "float32",
    )


def write_stub_model(folder: Path, config: Mapping, shards: int) -> Path:
    """A model folder of header-only stubs for `config`: config.json, `shards` safetensors files of about equal
    bytes (model-0000i-of-0000n.safetensors, consecutive tensors) and model.safetensors.index.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shape = config_shape(config)
    dtype = _TORCH_TO_SAFETENSORS[shape.dtype]
    sizes = shape.tensor_shapes()
    element = SAFETENSORS_DTYPE_BYTES[dtype]
    nbytes = {name: element * _numel(size) for name, size in sizes.items()}
    total = sum(nbytes.values())
    files: list[dict[str, tuple[str, tuple[int, ...]]]] = [{} for _ in range(shards)]
    start = 0
    for name, size in sizes.items():
        files[min(shards - 1, start * shards // total)][name] = (dtype, size)  # the shard where the tensor starts
        start += nbytes[name]
    weight_map = {}
    for number, tensors in enumerate(files, start=1):
        file_name = f"model-{number:05d}-of-{shards:05d}.safetensors"
        write_header_stub(folder / file_name, tensors)
        weight_map.update(dict.fromkeys(tensors, file_name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(dict(config), indent=2))
    return folder


def write_stub_family(out: Path, family: str) -> Path:
    """Stub folders of `family` (a key of STUB_FAMILIES) under `out`, and a search config `out/FAMILY.yaml` shaped
    like configs/llama3-medical.yaml whose worker is one 80 GiB GPU on a 256 GiB machine; returns the config."""
    out = Path(out).absolute()
    roles = STUB_FAMILIES[family]
    for name in roles.values():
        config, shards = STUB_MODELS[name]
        write_stub_model(out / name, config, shards)
    search = {
        "name": f"{family}-medical",
        "models": {
            "base": str(out / roles["base"]),
            "aligned": str(out / roles["aligned"]),
            "experts": {"medical": str(out / roles["medical"])},
            "guard": str(out / roles["guard"]),
        },
        "methods": ["ties", "dare_ties", "task_arithmetic", "slerp", "mergealign"],
        "layer_groups": 4,
        "sampler": "tpe",
        "workers": {"count": 1, "cpus": 8, "gpus": 1, "gpu_memory_gib": 80, "host_memory_gib": 256},
        "evaluation": {"judge": "guard", "max_tokens": 256, "max_model_len": 4096},
    }
    path = out / f"{family}.yaml"
    path.write_text(yaml.safe_dump(search, sort_keys=False))
    return path


def _numel(size: Sequence[int]) -> int:
    count = 1
    for dimension in size:
        count *= dimension
    return count


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m safemerge.zoo.stubs", description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write the stub models and their search configs into")
    parser.add_argument("--family", choices=sorted(STUB_FAMILIES), action="append", help="only these (repeatable)")
    args = parser.parse_args(argv)
    for family in args.family or list(STUB_FAMILIES):
        print(f"{family}: safemerge search plan {write_stub_family(args.out, family)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
