"""Which files of a model folder hold its weights: the one reader of Hugging Face weight indexes, shared by the
merge engine's checkpoints, the generation backends' weight checks and the release watcher's content hash."""

from __future__ import annotations

import json
from pathlib import Path

from safemerge.errors import UserError

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"


def weight_files(folder: Path, label: str, safetensors_only: bool = False) -> list[Path]:
    """The files that hold the weights of the model folder `folder`, in a stable order: the shards its index
    names, else model.safetensors (or pytorch_model.bin), else every *.safetensors file. `label` starts each
    error ("model 'medical'", "release /srv/x"): a broken index, a missing shard, or no weights at all."""
    folder = Path(folder)
    indexes = (SAFETENSORS_INDEX,) if safetensors_only else (SAFETENSORS_INDEX, PICKLE_INDEX)
    for index_name in indexes:
        index_path = folder / index_name
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise UserError(
                    f"{label}: {index_name} is not a weight index ({type(error).__name__}: {error}); "
                    "re-download the checkpoint"
                ) from None
            files = sorted({folder / name for name in weight_map.values()})
            missing = [path.name for path in files if not path.is_file()]
            if missing:
                raise UserError(
                    f"{label}: {index_name} names shard(s) {', '.join(missing)} that are missing from {folder}; "
                    "download the complete checkpoint"
                )
            return files
    singles = ("model.safetensors",) if safetensors_only else ("model.safetensors", "pytorch_model.bin")
    for single in singles:
        if (folder / single).is_file():
            return [folder / single]
    shards = sorted(folder.glob("*.safetensors"))
    if shards:
        return shards
    expected = f"model.safetensors or {SAFETENSORS_INDEX}" + ("" if safetensors_only else " or pytorch_model.bin")
    raise UserError(f"{label}: no weights in {folder} (expected {expected}); pass a folder that holds the checkpoint")
