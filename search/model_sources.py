"""Where a search's model references point: `zoo:NAME` (the embedded zoo), a local folder, or a Hugging Face
model id, downloaded on first use (the weights, configs and tokenizer files only)."""

from __future__ import annotations

from pathlib import Path

from safemerge.errors import UserError

HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.model"]


def resolve_model(reference: str, zoo_dir: Path) -> Path:
    """`zoo:NAME` -> the zoo folder; an existing folder -> itself; else a Hugging Face id, downloaded."""
    if reference.startswith("zoo:"):
        folder = Path(zoo_dir) / reference[len("zoo:") :]
        if not (folder / "config.json").is_file():
            raise UserError(
                f"zoo model {reference!r} is not at {folder}; build the zoo with `safemerge zoo build --out {zoo_dir}`"
            )
        return folder
    folder = Path(reference)
    if folder.is_dir():
        return folder
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(reference, allow_patterns=HUB_PATTERNS))
    except Exception as error:  # noqa: BLE001 - any hub failure becomes one clear line
        raise UserError(
            f"model {reference!r} is neither a folder nor reachable on the Hugging Face hub "
            f"({type(error).__name__}); pass a local folder"
        ) from None
