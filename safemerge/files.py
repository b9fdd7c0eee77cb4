"""Atomic outputs: a result folder or file appears under its final name complete, or not at all."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from safemerge.errors import UserError


def check_output_dir(out_dir: Path, force: bool, option: str = "--out") -> None:
    """Fail before any work when `out_dir` cannot be written or would overwrite a result without force."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{option} {out_dir} is a file, not a folder; pick a folder path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise UserError(f"{option} {out_dir} is not empty; pass --force to replace it, or pick another folder")
    parent = _existing_ancestor(out_dir.absolute().parent)
    if not parent.is_dir():
        raise UserError(f"{option} {out_dir} cannot be created: {parent} is not a folder; pick another path")
    try:
        probe = tempfile.mkdtemp(prefix=".safemerge-probe-", dir=parent)
    except OSError as error:
        raise UserError(
            f"{option} {out_dir} is not writable ({error.strerror}); pick a folder you can write to"
        ) from None
    os.rmdir(probe)


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


@contextlib.contextmanager
def atomic_output_dir(out_dir: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out_dir`; on success it replaces `out_dir`, on failure it is removed."""
    out_dir = Path(out_dir).absolute()
    check_output_dir(out_dir, force)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes 0700; the result should look like any folder
    try:
        yield staging
        if out_dir.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, trash / "old")
            os.replace(staging, out_dir)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def write_json_atomic(path: Path, data: object, keep_backup: bool = False, sort_keys: bool = False) -> None:
    """Write `data` as JSON to `path` with `write_text_atomic`."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=sort_keys) + "\n", keep_backup)


def write_text_atomic(path: Path, text: str, keep_backup: bool = False) -> None:
    """Write `text` to `path` so that a reader sees the old content or the new, never a part: written beside it,
    synced, then renamed over it in one step. `keep_backup` copies the previous content to PATH.bak first (the
    file itself is never absent)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        if keep_backup and path.is_file():
            shutil.copy2(path, path.with_name(path.name + ".bak"))
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)
