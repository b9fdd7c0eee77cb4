"""Writing a merged model as a Hugging Face folder: sharded safetensors (+ index), config, tokenizer, chat template
and generation config from the source folders, all inside an atomic output folder."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from safemerge.errors import UserError
from safemerge.files import atomic_output_dir
from safemerge.merges.checkpoint import TOKENIZER_FILES
from safemerge.weights import SAFETENSORS_INDEX

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*$", re.IGNORECASE)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2.5G', '1048576' -> bytes."""
    match = _SIZE.match(text)
    if not match:
        raise UserError(f"--shard-size {text!r} is not a size; write it like 5GB, 500MB or 1048576")
    number, unit = match.groups()
    size = int(float(number) * 1024 ** "BKMGT".index(unit.upper() or "B"))
    if size <= 0:
        raise UserError(f"--shard-size {text!r} must be positive; write it like 5GB")
    return size


def write_model_folder(
    tensors: Iterable[tuple[str, torch.Tensor]],
    out_dir: str | Path,
    config_folder: Path,
    tokenizer_folder: Path,
    shard_size: int = 5 * 1024**3,
    dtype: str | None = None,
    force: bool = False,
    extra_files: Mapping[str, str] | None = None,
    config_updates: Mapping[str, object] | None = None,
) -> Path:
    """Stream tensors into shards of at most `shard_size` bytes (a tensor is never split); one shard is
    model.safetensors, several are model-0000i-of-0000n.safetensors with model.safetensors.index.json."""
    out_dir = Path(out_dir)
    with atomic_output_dir(out_dir, force=force) as staging:
        shards: list[tuple[Path, list[str]]] = []
        pending: dict[str, torch.Tensor] = {}
        pending_bytes = 0
        total_bytes = 0

        def flush() -> None:
            nonlocal pending, pending_bytes
            if pending:
                path = staging / f"shard-{len(shards):05d}.safetensors"
                save_file(pending, str(path), metadata={"format": "pt"})
                shards.append((path, list(pending)))
                pending, pending_bytes = {}, 0

        for name, tensor in tensors:
            size = tensor.numel() * tensor.element_size()
            if pending and pending_bytes + size > shard_size:
                flush()
            pending[name] = tensor.detach().to("cpu").contiguous()
            pending_bytes += size
            total_bytes += size
        flush()

        weight_map = {}
        for index, (path, names) in enumerate(shards):
            final = (
                "model.safetensors" if len(shards) == 1 else f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
            )
            path.rename(staging / final)
            os.chmod(staging / final, 0o666 & ~_umask())  # safetensors writes 0600; a model folder is shared
            weight_map.update({name: final for name in names})
        if len(shards) > 1:
            index_data = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (staging / SAFETENSORS_INDEX).write_text(json.dumps(index_data, indent=2) + "\n")

        config = json.loads((config_folder / "config.json").read_text())
        config.update(config_updates or {})
        if dtype is not None:
            for key in ("dtype", "torch_dtype"):
                if key in config or key == "dtype":
                    config[key] = dtype
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if (config_folder / "generation_config.json").is_file():
            shutil.copy(config_folder / "generation_config.json", staging / "generation_config.json")
        for file_name in TOKENIZER_FILES:
            if (tokenizer_folder / file_name).is_file():
                shutil.copy(tokenizer_folder / file_name, staging / file_name)
        for file_name, text in (extra_files or {}).items():
            (staging / file_name).write_text(text)
    return out_dir
