"""Reading a Hugging Face model folder: its config and its tensors, lazily (safetensors through `safe_open`, pickle
checkpoints only through `torch.load(weights_only=True)`), with errors that name the folder and the fix."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from safemerge.errors import UserError
from safemerge.weights import read_safetensors_entries, weight_files

# Tokenizer and generation files a merged folder takes from its tokenizer source (the list mergekit copies).
TOKENIZER_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "added_tokens.json",
    "merges.txt",
    "vocab.json",
    "chat_template.jinja",
    "chat_template.json",
)


class Checkpoint:
    """One model folder: `config`, tensor names with shapes and dtypes from the file headers, and `tensor(name)`
    reading a single tensor on demand."""

    def __init__(self, folder: str | Path, label: str | None = None) -> None:
        self.folder = Path(folder)
        self.label = label or str(folder)
        if not self.folder.is_dir():
            raise UserError(
                f"model {self.label!r}: folder {self.folder} does not exist; pass a Hugging Face model folder"
            )
        config_path = self.folder / "config.json"
        if not config_path.is_file():
            raise UserError(f"model {self.label!r}: {config_path} is missing; a model folder needs its config.json")
        try:
            self.config: dict = json.loads(config_path.read_text())
        except json.JSONDecodeError as error:
            raise UserError(
                f"model {self.label!r}: {config_path} is not valid JSON ({error}); restore the file"
            ) from None
        self._files = weight_files(self.folder, f"model {self.label!r}")
        self._stack = ExitStack()
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self._where: dict[str, Path] = {}
        self._sources: dict[Path, Any] = {}  # a safe_open handle or a loaded state dict
        self._offsets: dict[str, tuple[int, int]] = {}  # safetensors: each tensor's byte range in its file
        for path in self._files:
            if path.suffix == ".safetensors":
                self._read_safetensors_header(path)
            else:
                self._read_pickle(path)
        if not self._where:
            raise UserError(f"model {self.label!r}: {self.folder} holds no tensors; pass a model folder with weights")

    def _read_safetensors_header(self, path: Path) -> None:
        try:
            handle = self._stack.enter_context(safe_open(str(path), framework="pt"))
        except Exception as error:  # safetensors raises its own error types for truncated or foreign files
            raise UserError(f"model {self.label!r}: cannot read {path} ({error}); re-download the file") from None
        for name in handle.keys():
            tensor_slice = handle.get_slice(name)
            self._shapes[name] = tuple(tensor_slice.get_shape())
            self._dtypes[name] = _SAFETENSORS_DTYPES.get(tensor_slice.get_dtype(), torch.float32)
            self._where[name] = path
        self._sources[path] = handle
        self._offsets.update({name: entry[2] for name, entry in read_safetensors_entries(path).items()})

    def _read_pickle(self, path: Path) -> None:
        try:
            # weights_only refuses arbitrary objects: a pickle can run code when unpickled without it.
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as error:
            raise UserError(
                f"model {self.label!r}: {path} is not a plain tensor checkpoint ({type(error).__name__}); safemerge "
                "loads pickle files only with weights_only=True; convert it to safetensors"
            ) from None
        if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
            raise UserError(f"model {self.label!r}: {path} does not hold a name -> tensor mapping; convert it")
        for name, tensor in state.items():
            self._shapes[name] = tuple(tensor.shape)
            self._dtypes[name] = tensor.dtype
            self._where[name] = path
        self._sources[path] = state

    @property
    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def dtype(self, name: str) -> torch.dtype:
        return self._dtypes[name]

    @property
    def num_layers(self) -> int | None:
        return self.config.get("num_hidden_layers")

    def tensor(self, name: str) -> torch.Tensor:
        """Read one tensor from disk (safetensors memory-maps it; nothing else is read)."""
        source = self._sources[self._where[name]]
        if isinstance(source, dict):
            return source[name]
        return source.get_tensor(name)

    def read(self, name: str, device: torch.device | str = "cpu", pin: bool = False) -> torch.Tensor:
        """Tensor `name` in memory of its own at its checkpoint dtype, on `device` (pinned host memory with `pin`).

        safetensors bytes are read straight into the tensor with plain file reads rather than through the memory
        map: a mapped page counts in the process's memory until the file is closed, so reading a model through
        the map holds it twice until then."""
        device = torch.device(device)
        if name not in self._offsets:  # a pickle checkpoint: torch.load mapped it already
            return self.tensor(name).to(device, copy=True)
        begin, end = self._offsets[name]
        staged = torch.empty(self._shapes[name], dtype=self._dtypes[name], pin_memory=pin and device.type == "cpu")
        view = staged.view(-1).view(torch.uint8).numpy() if staged.numel() else None
        if view is not None:
            if view.nbytes != end - begin:
                raise UserError(
                    f"model {self.label!r}: tensor {name} in {self._where[name]} holds {end - begin} bytes, not the "
                    f"{view.nbytes} its shape and dtype need; re-download the file"
                )
            with open(self._where[name], "rb") as file:
                file.seek(begin)
                if file.readinto(view) != view.nbytes:
                    raise UserError(f"model {self.label!r}: {self._where[name]} is truncated; re-download the file")
        return staged if device.type == "cpu" else staged.to(device)

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names:
            yield name, self.tensor(name)

    def close(self) -> None:
        self._stack.close()
        self._sources.clear()


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


# Tensors with one row per token: a vocabulary mismatch shows in their first dimension.
EMBEDDING_SUFFIXES = ("embed_tokens.weight", "lm_head.weight", "wte.weight", "embed_in.weight", "embed_out.weight")
OUTPUT_LAYER = "lm_head.weight"


def _vocabulary(checkpoint: Checkpoint) -> tuple[int | None, dict[str, int]]:
    """The config's vocab_size and the rows of each embedding tensor in the files."""
    names = [name for name in checkpoint.names if name.endswith(EMBEDDING_SUFFIXES) and checkpoint.shape(name)]
    # the input embeddings first: the tensor a message names is the one a user resizes
    names.sort(key=lambda name: [name.endswith(suffix) for suffix in EMBEDDING_SUFFIXES].index(True))
    return checkpoint.config.get("vocab_size"), {name: checkpoint.shape(name)[0] for name in names}


def _check_vocabulary(base: Checkpoint, other: Checkpoint) -> None:
    """Refuse models with different vocabularies before the generic shape check: their tokenizers differ, so
    rows of the embeddings mean different tokens, and no per-tensor merge of them means anything."""
    base_size, base_rows = _vocabulary(base)
    other_size, other_rows = _vocabulary(other)
    shared = [name for name in base_rows if name in other_rows and base_rows[name] != other_rows[name]]
    if base_size == other_size and not shared:
        return

    name = shared[0] if shared else next(iter(base_rows), None)

    def described(size: int | None, rows: dict[str, int]) -> str:
        text = f"vocab_size {size}" if size is not None else "no vocab_size"
        return text + (f" ({name}: {rows[name]} rows)" if name in rows else "")

    raise UserError(
        f"model {other.label!r} has {described(other_size, other_rows)} but base {base.label!r} has "
        f"{described(base_size, base_rows)}; merge models that share the base's tokenizer and vocabulary "
        "(resize the expert's embeddings to the base's vocabulary first)"
    )


def _check_tied(base: Checkpoint, other: Checkpoint) -> None:
    """Refuse one model with its own output layer and another that ties it to its embeddings (no lm_head.weight
    in its files): the generic 'lacks tensor' message would not say why."""
    base_own, other_own = OUTPUT_LAYER in base.names, OUTPUT_LAYER in other.names
    if base_own == other_own:
        return
    untied, tied = (base, other) if base_own else (other, base)
    untied_role = "base" if untied is base else "model"
    tied_role = "base" if tied is base else "model"
    raise UserError(
        f"{tied_role} {tied.label!r} ties its output layer to its embeddings (no {OUTPUT_LAYER} in its files, "
        f"tie_word_embeddings {tied.config.get('tie_word_embeddings')!r}) but {untied_role} {untied.label!r} has "
        f"its own {OUTPUT_LAYER}; merge models that are all tied or all untied (untie the tied one by saving "
        f"{OUTPUT_LAYER} as a copy of its embed_tokens.weight)"
    )


def check_compatible(base: Checkpoint, others: list[Checkpoint]) -> None:
    """Fail before any tensor is read when the models cannot be merged tensor by tensor."""
    for other in others:
        for key in ("model_type", "architectures", "num_hidden_layers"):
            if base.config.get(key) != other.config.get(key):
                raise UserError(
                    f"model {other.label!r} has {key} {other.config.get(key)!r} but base {base.label!r} has "
                    f"{base.config.get(key)!r}; merge models of one architecture"
                )
        _check_vocabulary(base, other)
        _check_tied(base, other)
        missing = [name for name in base.names if name not in other._where]
        extra = [name for name in other.names if name not in base._where]
        if missing or extra:
            detail = f"lacks tensor {missing[0]}" if missing else f"has tensor {extra[0]} that the base lacks"
            raise UserError(
                f"model {other.label!r} {detail} ({len(missing)} missing, {len(extra)} extra); merge models with "
                "the same tensor names"
            )
        for name in base.names:
            if base.shape(name) != other.shape(name):
                raise UserError(
                    f"model {other.label!r} has tensor {name} of shape {other.shape(name)}; base {base.label!r} has "
                    f"{base.shape(name)}; merge models of the same size"
                )
