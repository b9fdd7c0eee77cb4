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
from safemerge.weights import weight_files

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


def check_compatible(base: Checkpoint, others: list[Checkpoint]) -> None:
    """Fail before any tensor is read when the models cannot be merged tensor by tensor."""
    for other in others:
        for key in ("model_type", "architectures", "num_hidden_layers"):
            if base.config.get(key) != other.config.get(key):
                raise UserError(
                    f"model {other.label!r} has {key} {other.config.get(key)!r} but base {base.label!r} has "
                    f"{base.config.get(key)!r}; merge models of one architecture"
                )
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
