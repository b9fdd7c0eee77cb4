"""A family of random weights: a base and fine-tunes of it (base plus small random deltas), Llama- or Qwen2-shaped,
in the checkpoint formats real families come in (bf16/fp16, sharded with an index, tied embeddings, grouped-query
attention, attention biases), optionally with the zoo's tokenizer so vLLM and transformers can run it.

For the merge benchmarks, the engine's device and format tests and the random-family search, where what the weights
say does not matter and training them (the zoo) would only cost time."""

from __future__ import annotations

import json
import shutil
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from safemerge.weights import SAFETENSORS_INDEX

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BASE_SCALE = 0.02  # the base's weights: normal with this standard deviation (norm weights: 1 plus that)
DELTA_SCALE = 0.002  # an expert's fine-tune: base plus a normal delta of this standard deviation
MARKER = "family.json"  # in `work`: what the folders there were written with, so a changed call rewrites them


@dataclass(frozen=True)
class LlamaShape:
    """A decoder's shape and format. `kv_heads` below `heads` is grouped-query attention; `attention_bias` makes it
    Qwen2-shaped (q/k/v biases, Qwen2ForCausalLM); `tie_embeddings` drops lm_head.weight from the files; `dtype` is
    the dtype the tensors are saved in (float32, bfloat16, float16)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    kv_heads: int | None = None
    tie_embeddings: bool = False
    attention_bias: bool = False
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"LlamaShape dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.hidden % self.heads:
            raise ValueError(f"LlamaShape hidden {self.hidden} is not a multiple of heads {self.heads}")
        if self.heads % self.key_value_heads:
            raise ValueError(f"LlamaShape heads {self.heads} is not a multiple of kv_heads {self.kv_heads}")

    @property
    def key_value_heads(self) -> int:
        return self.kv_heads or self.heads

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def config(self, vocab: int | None = None) -> dict:
        """The folder's config.json (with `vocab` in place of the shape's, where given)."""
        config = {
            "architectures": ["Qwen2ForCausalLM" if self.attention_bias else "LlamaForCausalLM"],
            "model_type": "qwen2" if self.attention_bias else "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "vocab_size": vocab or self.vocab,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "tie_word_embeddings": self.tie_embeddings,
            "torch_dtype": self.dtype,  # transformers before 4.56 and vLLM's older config readers
            "dtype": self.dtype,
        }
        if self.attention_bias:
            config.update({"use_sliding_window": False, "sliding_window": None, "max_window_layers": self.layers})
        else:
            config.update({"attention_bias": False, "mlp_bias": False})
        return config

    def tensor_shapes(self, vocab: int | None = None) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every tensor the checkpoint's files hold, in file order."""
        hidden, intermediate, vocab = self.hidden, self.intermediate, vocab or self.vocab
        query, key_value = self.heads * self.head_dim, self.key_value_heads * self.head_dim
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
        for layer in range(self.layers):
            prefix = f"model.layers.{layer}."
            shapes.update(
                {
                    prefix + "input_layernorm.weight": (hidden,),
                    prefix + "post_attention_layernorm.weight": (hidden,),
                    prefix + "self_attn.q_proj.weight": (query, hidden),
                    prefix + "self_attn.k_proj.weight": (key_value, hidden),
                    prefix + "self_attn.v_proj.weight": (key_value, hidden),
                    prefix + "self_attn.o_proj.weight": (hidden, query),
                    prefix + "mlp.gate_proj.weight": (intermediate, hidden),
                    prefix + "mlp.up_proj.weight": (intermediate, hidden),
                    prefix + "mlp.down_proj.weight": (hidden, intermediate),
                }
            )
            if self.attention_bias:
                shapes.update(
                    {
                        prefix + "self_attn.q_proj.bias": (query,),
                        prefix + "self_attn.k_proj.bias": (key_value,),
                        prefix + "self_attn.v_proj.bias": (key_value,),
                    }
                )
        shapes["model.norm.weight"] = (hidden,)
        if not self.tie_embeddings:
            shapes["lm_head.weight"] = (vocab, hidden)
        return shapes

    def parameters(self) -> int:
        """Parameters per model (what the files hold: a tied lm_head counts once)."""
        return sum(_numel(size) for size in self.tensor_shapes().values())


def llama_tensors(shape: LlamaShape, generator: torch.Generator, scale: float) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint of `shape`, fp32, normal with standard deviation `scale`."""
    return {name: torch.randn(size, generator=generator) * scale for name, size in shape.tensor_shapes().items()}


def write_random_family(
    work: Path,
    shape: LlamaShape,
    experts: Sequence[str],
    seed: int = 0,
    shard_size: int | None = None,
    vocab_sizes: Mapping[str, int] | None = None,
    tokenizer_from: Path | None = None,
) -> dict[str, Path]:
    """Folders `base` (weights of scale 0.02) and one per expert (base plus a delta of scale 0.002) under `work`;
    returns name -> folder. Every value depends only on (seed, model, tensor name), so it does not change with the
    sharding or the other models. `shard_size` (bytes) splits each model into model-0000i-of-0000n.safetensors
    files with a model.safetensors.index.json; `vocab_sizes` gives a model its own vocabulary size (its embedding
    rows: the base's first rows plus a delta, then fresh rows); `tokenizer_from` (a model folder such as
    artifacts/zoo/base) copies its tokenizer, chat template and generation config into every folder. Generated
    tensor by tensor: it holds at most one shard per model at the shape's dtype and one fp32 tensor.
    Folders already written there with the same arguments are kept."""
    work = Path(work)
    vocab_sizes = dict(vocab_sizes or {})
    folders = {name: work / name for name in ("base", *experts)}
    unknown = sorted(set(vocab_sizes) - set(folders))
    if unknown:
        raise ValueError(f"vocab_sizes names {', '.join(unknown)}, not a model of the family {sorted(folders)}")
    tokenizer = _load_tokenizer(Path(tokenizer_from), shape, vocab_sizes) if tokenizer_from else None
    marker = {
        "shape": asdict(shape),
        "experts": list(experts),
        "seed": seed,
        "shard_size": shard_size,
        "vocab_sizes": vocab_sizes,
        "tokenizer_from": str(tokenizer_from) if tokenizer_from else None,
    }
    marker_path = work / MARKER
    if marker_path.is_file() and json.loads(marker_path.read_text()) == marker:
        return folders
    marker_path.unlink(missing_ok=True)
    dtype = DTYPES[shape.dtype]
    vocabs = {name: vocab_sizes.get(name, shape.vocab) for name in folders}
    shapes = {name: shape.tensor_shapes(vocabs[name]) for name in folders}
    shards = {name: _plan_shards(shapes[name], dtype, shard_size) for name in folders}
    for name, folder in folders.items():
        if folder.exists():
            shutil.rmtree(folder)  # a stale shard of an earlier call would otherwise stay in the folder
        folder.mkdir(parents=True)
        config = shape.config(vocabs[name])
        if tokenizer is not None:
            config.update(_token_ids(tokenizer))
            _write_tokenizer(tokenizer, Path(tokenizer_from), folder)
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    pending: dict[str, dict[str, torch.Tensor]] = {name: {} for name in folders}
    for tensor_name in shapes["base"]:
        base = _base_tensor(seed, tensor_name, shapes["base"][tensor_name])
        for model in folders:
            value = base if model == "base" else base + _delta(seed, model, tensor_name, base.shape)
            value = _resize_rows(value, shapes[model][tensor_name], seed, model, tensor_name)
            pending[model][tensor_name] = value.to(dtype)
            file_name, last_name = shards[model][tensor_name]
            if tensor_name == last_name:
                # safetensors' own metadata key, which transformers' loader reads
                save_file(pending[model], str(folders[model] / file_name), metadata={"format": "pt"})
                pending[model] = {}
    if shard_size is not None:
        element = torch.empty((), dtype=dtype).element_size()
        for model, folder in folders.items():
            index = {
                "metadata": {"total_size": sum(_numel(size) * element for size in shapes[model].values())},
                "weight_map": {tensor: file_name for tensor, (file_name, _) in shards[model].items()},
            }
            (folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))
    marker_path.write_text(json.dumps(marker, indent=2))
    return folders


def _numel(size: Sequence[int]) -> int:
    count = 1
    for dimension in size:
        count *= dimension
    return count


def _generator(seed: int, *key: str) -> torch.Generator:
    # crc32, not hash(): the same values in every process, whatever PYTHONHASHSEED is
    return torch.Generator().manual_seed(zlib.crc32(":".join((str(seed), *key)).encode()))


def _base_tensor(seed: int, name: str, size: tuple[int, ...]) -> torch.Tensor:
    tensor = torch.randn(size, generator=_generator(seed, "base", name)) * BASE_SCALE
    # norms near 1 as in a trained model, so activations neither vanish nor blow up when vLLM runs it
    return tensor + 1.0 if name.endswith("norm.weight") else tensor


def _delta(seed: int, model: str, name: str, size: torch.Size) -> torch.Tensor:
    return torch.randn(size, generator=_generator(seed, model, name)) * DELTA_SCALE


def _resize_rows(value: torch.Tensor, size: tuple[int, ...], seed: int, model: str, name: str) -> torch.Tensor:
    """`value` with the rows of `size` (a model with its own vocabulary): cut, or extended with fresh rows."""
    if tuple(value.shape) == size:
        return value
    if size[0] <= value.shape[0]:
        return value[: size[0]].clone()
    extra = torch.randn((size[0] - value.shape[0], *size[1:]), generator=_generator(seed, model, name, "rows"))
    return torch.cat([value, extra * BASE_SCALE])


def _plan_shards(
    shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, shard_size: int | None
) -> dict[str, tuple[str, str]]:
    """Tensor name -> (its file, the last tensor of that file): consecutive tensors fill a shard up to
    `shard_size` bytes (a larger tensor gets a shard of its own), as transformers' save_pretrained cuts them."""
    names = list(shapes)
    if shard_size is None:
        return {name: ("model.safetensors", names[-1]) for name in names}
    element = torch.empty((), dtype=dtype).element_size()
    groups: list[list[str]] = [[]]
    filled = 0
    for name in names:
        size = _numel(shapes[name]) * element
        if groups[-1] and filled + size > shard_size:
            groups.append([])
            filled = 0
        groups[-1].append(name)
        filled += size
    plan = {}
    for number, group in enumerate(groups, start=1):
        file_name = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        plan.update({name: (file_name, group[-1]) for name in group})
    return plan


def _load_tokenizer(source: Path, shape: LlamaShape, vocab_sizes: Mapping[str, int]):
    """The tokenizer of the model folder `source`; refuses a family vocabulary smaller than the tokenizer's (its
    ids would index past the embedding)."""
    from transformers import AutoTokenizer  # imported late: the benchmarks never need it

    tokenizer = AutoTokenizer.from_pretrained(source)
    smallest = min([shape.vocab, *vocab_sizes.values()])
    if smallest < len(tokenizer):
        raise ValueError(
            f"the tokenizer of {source} has {len(tokenizer)} tokens but the family's vocabulary is {smallest}; "
            f"give the shape vocab >= {len(tokenizer)}"
        )
    return tokenizer


def _token_ids(tokenizer) -> dict[str, int]:
    """config.json's special token ids, as the zoo's folders carry them."""
    ids = {key: getattr(tokenizer, key) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return {key: value for key, value in ids.items() if value is not None}


def _write_tokenizer(tokenizer, source: Path, folder: Path) -> None:
    """The tokenizer files and chat template (as the zoo's folders hold them) and `source`'s generation config."""
    from transformers import GenerationConfig

    tokenizer.save_pretrained(folder)
    if (source / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(source).save_pretrained(folder)
