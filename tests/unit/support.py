"""Helpers of the fast tier: a search config built from plain data (no zoo, no config file) and a tiny model
family of a few hand-made tensors (no zoo, no engine)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from safemerge.search.config import SearchConfig, parse_config

# The zoo default's shape (configs/zoo.yaml), written out so that these tests do not depend on that file.
CONFIG_DATA = {
    "name": "unit",
    "models": {"base": "zoo:base", "aligned": "zoo:aligned", "experts": {"medical": "zoo:medical"}},
    "methods": ["task_arithmetic", "ties", "dare_ties", "mergealign"],
    "layer_groups": 2,
    "module_filters": True,
    "objectives": {"maximize": ["safety", "domain"], "constraints": {"over_refusal": "<= 0.1"}},
    "sampler": "tpe",
    "trials": 24,
    "seed": 0,
}


def config_data() -> dict:
    """A fresh copy of the config data (parse_config writes overrides into the mapping it is given)."""
    return copy.deepcopy(CONFIG_DATA)


def make_config(**overrides) -> SearchConfig:
    """The unit config with dotted overrides, e.g. make_config(**{"evaluation.limit": 5})."""
    return parse_config(config_data(), "unit.yaml", overrides)


# A two-layer Llama-shaped family: every tensor of `aligned` is the base's plus 1, of `medical` the base's plus 2,
# so a merge's result shows which coefficient reached which tensor.
NUM_LAYERS = 2
TENSOR_SHAPES = {
    "model.embed_tokens.weight": (5, 3),
    "model.layers.0.self_attn.q_proj.weight": (3, 3),
    "model.layers.0.mlp.up_proj.weight": (4, 3),
    "model.layers.1.self_attn.q_proj.weight": (3, 3),
    "model.layers.1.mlp.up_proj.weight": (4, 3),
    "model.norm.weight": (3,),
}
OFFSETS = {"base": 0.0, "aligned": 1.0, "medical": 2.0}


def base_tensor(name: str) -> torch.Tensor:
    shape = TENSOR_SHAPES[name]
    return torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape) / 10


def write_tiny_family(folder: Path) -> dict[str, Path]:
    """role -> model folder (config.json + model.safetensors) of the tiny family, written under `folder`."""
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": NUM_LAYERS}
    folders = {}
    for role, offset in OFFSETS.items():
        model = folder / role
        model.mkdir(parents=True)
        (model / "config.json").write_text(json.dumps(config))
        save_file({name: base_tensor(name) + offset for name in TENSOR_SHAPES}, str(model / "model.safetensors"))
        folders[role] = model
    return folders
