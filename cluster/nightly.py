"""`safemerge nightly`: submit one search job per expert release not searched yet.

A release is a model folder under --releases (or a Hugging Face repo revision, `hf:ORG/NAME[@REVISION]`),
identified by a hash of its safetensors content (the revision's commit sha on the hub). The watcher is
idempotent: under a file lock it records each release as `submitting` (with a submission id derived from
the release hash) before it submits, and as `submitted` after. A watcher that crashed in between is repaired
by the next one, which asks Ray whether that submission id exists; Ray refuses a second job with the same
submission id, so a release is never searched twice even when the state file is lost.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock, Timeout

from safemerge.cluster.jobs import job_client, runtime_env, search_entrypoint
from safemerge.cluster.processes import http_ok
from safemerge.errors import UserError
from safemerge.files import write_json_atomic
from safemerge.search.config import SearchConfig, load_config
from safemerge.search.secrets import secret_environment
from safemerge.weights import content_hash

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# A release folder with a file changed this recently is still being copied.
SETTLE_S = 60.0
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


@dataclasses.dataclass(frozen=True)
class Release:
    name: str
    reference: str  # what the search config's experts entry gets: a folder or a hub id
    release_id: str

    @property
    def submission_id(self) -> str:
        return f"safemerge-{self.release_id[:24]}"


def scan_releases(
    source: str, cache: dict, log: Callable[[str], None] = print, settle_s: float = SETTLE_S
) -> list[Release]:
    """Every release the source offers, oldest first (folders by modification time). A folder that is a link to
    somewhere outside the releases folder is skipped with a line: a search must read only what landed there. So
    is one with a file changed in the last `settle_s` seconds: it is still being copied, and the next run takes
    it."""
    if source.startswith("hf:"):
        return [_hub_release(source[len("hf:") :])]
    folder = Path(source)
    if not folder.is_dir():
        raise UserError(f"--releases {source} is not a folder; pass the folder your expert releases land in")
    root = folder.resolve()
    candidates = []
    for child in folder.iterdir():
        if not child.is_dir() or child.name.startswith("."):
            continue
        if not child.resolve().is_relative_to(root):
            log(
                f"nightly: {child.name} links to {child.resolve()}, outside {root}: skipped; copy or move the release "
                "into the releases folder"
            )
            continue
        changed = time.time() - newest_change(child)
        if changed < settle_s:
            log(f"nightly: {child.name} changed {changed:.0f} s ago: still being copied? skipped until it is stable")
            continue
        candidates.append(child)
    candidates.sort(key=lambda child: (child.stat().st_mtime, child.name))
    return [Release(child.name, str(child.resolve()), content_hash(child, cache)) for child in candidates]


def newest_change(folder: Path) -> float:
    """The latest modification time of the folder or anything in it."""
    return max([folder.stat().st_mtime, *(path.stat().st_mtime for path in folder.rglob("*"))])


def _hub_release(spec: str) -> Release:
    """A Hugging Face repo at a revision, identified by its commit sha (the search downloads it)."""
    from huggingface_hub import HfApi

    repo, _, revision = spec.partition("@")
    try:
        info = HfApi().model_info(repo, revision=revision or None)
    except Exception as error:  # noqa: BLE001 - offline, private, misspelled: one line
        raise UserError(f"--releases hf:{spec}: the hub did not answer for it ({type(error).__name__})") from None
    # Pinned: every worker downloads this commit, whatever lands on the hub while the search runs.
    return Release(repo.replace("/", "--"), f"{repo}@{info.sha}", info.sha)


def search_config_for(template: SearchConfig, release: Release, domain: str | None) -> dict:
    """The template with the release as its expert and a search name of its own."""
    experts = template.models.experts
    if domain is None:
        if len(experts) != 1:
            raise UserError(f"the template has experts {sorted(experts)}; pass --domain to say which one to replace")
        domain = next(iter(experts))
    elif domain not in experts:
        raise UserError(f"--domain {domain!r} is not an expert of the template (it has {sorted(experts)})")
    data = template.model_dump(mode="json")
    data["models"]["experts"][domain] = release.reference
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", release.name).strip("-.") or "release"
    data["name"] = f"{template.name}-{slug}-{release.release_id[:8]}"
    return SearchConfig.model_validate(data).model_dump(mode="json")


def check_tracking_uri(uri: str) -> None:
    if uri.startswith(("http://", "https://")) and not http_ok(f"{uri.rstrip('/')}/health", timeout=5):
        raise UserError(f"the MLflow tracking server {uri} does not answer; start it (`safemerge cluster up`) first")


def _read_state(path: Path) -> dict:
    if not path.is_file():
        return {"releases": {}, "hash_cache": {}}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"state file {path} is not valid JSON ({error}); restore it from its .bak copy") from None


def _write_state(path: Path, state: dict) -> None:
    write_json_atomic(path, state, keep_backup=True, sort_keys=True)


def _job_exists(client, submission_id: str) -> bool:
    try:
        client.get_job_info(submission_id)
        return True
    except Exception:  # noqa: BLE001 - the SDK raises a RuntimeError for an unknown id
        return False


def run_nightly(
    releases: str,
    template_path: Path,
    address: str,
    state_path: Path,
    domain: str | None = None,
    mlflow_uri: str | None = None,
    wait: bool = False,
    working_dir: Path = PROJECT_ROOT,
    lock_timeout: float = 600.0,
    log: Callable[[str], None] = print,
    settle_s: float = SETTLE_S,
) -> list[dict]:
    """Submit a search for every new release; returns one record per job submitted by this call."""
    state_path = Path(state_path)
    overrides = {"mlflow.tracking_uri": mlflow_uri} if mlflow_uri else None
    template = load_config(template_path, overrides)
    check_tracking_uri(template.mlflow.tracking_uri)
    client = job_client(address)
    state_path.parent.mkdir(parents=True, exist_ok=True)
    submitted: list[dict] = []
    try:
        with FileLock(str(state_path) + ".lock", timeout=lock_timeout):
            state = _read_state(state_path)
            state_before_cache = state.get("hash_cache", {})
            cache = dict(state_before_cache)
            found = scan_releases(releases, cache, log, settle_s)
            configs = {release.release_id: search_config_for(template, release, domain) for release in found}
            state["hash_cache"] = cache
            for release in found:
                record = state["releases"].get(release.release_id)
                if record and record["status"] == "submitted":
                    continue
                if record and record["status"] == "submitting" and _job_exists(client, release.submission_id):
                    log(f"nightly: {release.name}: job {release.submission_id} was submitted before a crash")
                else:
                    record = {
                        "name": release.name,
                        "reference": release.reference,
                        "submission_id": release.submission_id,
                        "search": configs[release.release_id]["name"],
                        "status": "submitting",
                        "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    }
                    state["releases"][release.release_id] = record
                    _write_state(state_path, state)
                    client.submit_job(
                        entrypoint=search_entrypoint(configs[release.release_id]),
                        submission_id=release.submission_id,
                        # The storage password (if any) by environment: it is in no entrypoint or config.
                        runtime_env=runtime_env(working_dir, secret_environment(template.storage)),
                        metadata={"safemerge_release": release.name, "safemerge_search": record["search"]},
                    )
                    log(f"nightly: {release.name}: submitted job {release.submission_id} (search {record['search']})")
                record["status"] = "submitted"
                state["releases"][release.release_id] = record
                _write_state(state_path, state)
                submitted.append(record)
            if not submitted:
                if cache != state_before_cache:  # only newly hashed files to remember
                    _write_state(state_path, state)
                log(f"nightly: nothing new in {releases} ({len(found)} releases, all searched)")
    except Timeout:
        raise UserError(
            f"another watcher holds {state_path}.lock for over {lock_timeout:.0f} s; try again later"
        ) from None
    if wait:
        for record in submitted:
            record["job_status"] = wait_for_job(client, record["submission_id"], log)
    return submitted


def wait_for_job(client, submission_id: str, log: Callable[[str], None] = print, poll_seconds: float = 5.0) -> str:
    while (status := str(client.get_job_status(submission_id).value)) not in TERMINAL:
        time.sleep(poll_seconds)
    log(f"nightly: job {submission_id}: {status}")
    return status
