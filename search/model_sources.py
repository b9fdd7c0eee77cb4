"""Where a search's model references point: `zoo:NAME` (the embedded zoo), a local folder, or a Hugging Face
model id (`ORG/NAME`, or `ORG/NAME@REVISION` pinned to a branch, tag or commit), downloaded on first use (the
weights, configs and tokenizer files only)."""

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

    repo, revision = split_revision(reference)
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as error:  # noqa: BLE001 - any hub failure becomes one clear line
        raise UserError(
            f"model {reference!r} is neither a folder nor reachable on the Hugging Face hub "
            f"({type(error).__name__}); pass a local folder"
        ) from None


def split_revision(reference: str) -> tuple[str, str | None]:
    """A hub reference's repo id and revision: `ORG/NAME@REV` -> (ORG/NAME, REV); without `@` the revision is None."""
    repo, _, revision = reference.partition("@")
    return repo, revision or None


def is_hub_reference(reference: str) -> bool:
    return not reference.startswith("zoo:") and not Path(reference).is_dir()


def pinned_reference(reference: str) -> str:
    """A hub reference pinned to the commit its revision (default: main) points at now, so that every worker
    downloads the same weights whatever lands on the hub during the search; zoo and folder references as they
    are."""
    if not is_hub_reference(reference):
        return reference
    from huggingface_hub import HfApi

    repo, revision = split_revision(reference)
    try:
        sha = HfApi().model_info(repo, revision=revision).sha
    except Exception as error:  # noqa: BLE001 - offline, private, misspelled: one line
        raise UserError(
            f"model {reference!r}: the Hugging Face hub did not answer for it ({type(error).__name__}); "
            "check the id and your network, or pass a local folder"
        ) from None
    return f"{repo}@{sha}"


def release_id(reference: str, zoo_dir: Path) -> str:
    """What identifies the weights a reference names: a pinned hub reference's commit, a folder's (or zoo
    model's) safetensors content hash."""
    if is_hub_reference(reference):
        repo, revision = split_revision(pinned_reference(reference))
        return str(revision)
    from safemerge.weights import content_hash

    return content_hash(resolve_model(reference, zoo_dir), {})
