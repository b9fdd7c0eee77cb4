"""Which files of a model folder hold its weights, and what they hold: the one reader of Hugging Face weight
indexes (shared by the merge engine's checkpoints, the generation backends' weight checks and the release
watcher's content hash) and of safetensors headers without their data (the memory plan)."""

from __future__ import annotations

import hashlib
import json
import os
import struct
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
            for tensor, name in weight_map.items():
                _check_inside(folder, name, f"{label}: {index_name}", tensor)
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


def _check_inside(folder: Path, name: object, where: str, tensor: str) -> None:
    """Refuse an index entry that names a file outside `folder`: a relative name that climbs out ("../x") or an
    absolute path. The check is on the name, not on the resolved file, because a Hugging Face cache snapshot's
    shards are symlinks into its blobs/ folder; a symlinked model folder is fine too."""
    if not isinstance(name, str) or not name:
        raise UserError(f"{where} maps {tensor} to {name!r}, not a file name; re-download the checkpoint")
    root = os.path.normpath(Path(folder).resolve())
    target = os.path.normpath(os.path.join(root, name))
    if os.path.isabs(name) or os.path.commonpath([root, target]) != root or target == root:
        raise UserError(
            f"{where} maps {tensor} to {name!r}, a file outside {folder}; an index names shards inside its own "
            "folder: re-download the checkpoint, or fix that entry of the index"
        )


# Bytes per element of each safetensors dtype (the header's spelling).
SAFETENSORS_DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
# safetensors itself refuses headers above 100 MB; a larger length field means a foreign or damaged file.
MAX_HEADER_BYTES = 100_000_000

TensorLayout = tuple[str, str, tuple[int, ...]]  # (tensor name, safetensors dtype, shape)


def read_safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (safetensors dtype such as "BF16", shape), from the 8-byte length and the JSON header of a
    safetensors file; no tensor data is read, so a header-only stub (a valid header and no data) reads too, which
    `safetensors.safe_open` refuses."""
    return {name: (dtype, shape) for name, (dtype, shape, _) in read_safetensors_entries(path).items()}


def read_safetensors_entries(path: Path) -> dict[str, tuple[str, tuple[int, ...], tuple[int, int]]]:
    """Tensor name -> (dtype, shape, absolute byte range of its data in the file), from the header alone."""
    path = Path(path)

    def broken(what: str) -> UserError:
        return UserError(f"{path} is not a safetensors file ({what}); re-download it")

    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise broken(f"{len(prefix)} bytes, shorter than the 8-byte header length: truncated")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_BYTES:
            raise broken(f"its header length field says {length} bytes")
        raw = handle.read(length)
    if len(raw) < length:
        raise broken(f"header of {length} bytes, the file ends after {len(raw)}: truncated")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise broken(f"its header is not JSON: {error}") from None
    if not isinstance(header, dict):
        raise broken("its header is not a mapping of tensor names")
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        shape = entry.get("shape") if isinstance(entry, dict) else None
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (
            dtype not in SAFETENSORS_DTYPE_BYTES
            or not isinstance(shape, list)
            or not all(isinstance(size, int) and size >= 0 for size in shape)
            or not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(offset, int) for offset in offsets)
        ):
            raise broken(f"tensor {name!r} has entry {entry!r}, not a dtype, a shape and two data offsets")
        numel = 1
        for size in shape:
            numel *= size
        if offsets[1] - offsets[0] != numel * SAFETENSORS_DTYPE_BYTES[dtype]:
            raise broken(
                f"tensor {name!r} of shape {tuple(shape)} in {dtype} spans data offsets {offsets}, "
                f"not {numel * SAFETENSORS_DTYPE_BYTES[dtype]} bytes"
            )
        tensors[name] = (dtype, tuple(shape), (8 + length + offsets[0], 8 + length + offsets[1]))
    return tensors


def checkpoint_layout(folder: Path, label: str) -> list[TensorLayout]:
    """(name, safetensors dtype, shape) of every tensor of the model folder `folder`, read from its safetensors
    headers only (no tensor data). `label` starts each error; a pickle checkpoint is refused (no header)."""
    layout = []
    for path in weight_files(folder, label):
        if path.suffix != ".safetensors":
            raise UserError(
                f"{label}: {path} is a pickle checkpoint; the memory plan reads safetensors headers only: convert "
                "the model to safetensors (e.g. save_pretrained(..., safe_serialization=True))"
            )
        try:
            tensors = read_safetensors_header(path)
        except UserError as error:
            raise UserError(f"{label}: {error}") from None
        layout.extend((name, dtype, shape) for name, (dtype, shape) in tensors.items())
    return layout


HASH_CHUNK = 16 << 20


def safetensors_files(folder: Path) -> list[Path]:
    """The files whose content identifies a model release: its safetensors index (when sharded) and weights."""
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        raise UserError(
            f"release {folder} is not a model folder (it needs config.json and *.safetensors); "
            "move it out of the releases folder or finish copying it"
        )
    index = folder / SAFETENSORS_INDEX
    return ([index] if index.is_file() else []) + weight_files(folder, f"release {folder}", safetensors_only=True)


def content_hash(folder: Path, cache: dict) -> str:
    """sha256 over the folder's safetensors files (cached by path, size and mtime: releases are read-only)."""
    digest = hashlib.sha256()
    for path in safetensors_files(folder):
        stat = path.stat()
        key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        if key not in cache:
            file_digest = hashlib.sha256()
            with open(path, "rb") as handle:
                while chunk := handle.read(HASH_CHUNK):
                    file_digest.update(chunk)
            cache[key] = file_digest.hexdigest()
        digest.update(f"{path.name}:{cache[key]}\n".encode())
    return digest.hexdigest()
