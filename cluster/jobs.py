"""Submitting searches as Ray jobs: the job client (with Ray's token authentication), the runtime environment
that uploads only the code, and the entrypoint command of `safemerge.cluster.job`."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

from safemerge.errors import UserError

# Never uploaded with --working-dir: environments, models, data, tracking stores and results. Ray also reads
# .gitignore and .rayignore; these are passed explicitly so SDK submissions do not depend on them.
RUNTIME_ENV_EXCLUDES = [
    ".venv/",
    ".git/",
    "artifacts/",
    "mlruns/",
    "mlartifacts/",
    "ray_results/",
    "*.db",
    "*.safetensors",
    "*.bin",
    "*.pt",
    "__pycache__/",
    ".pytest_cache/",
    ".ruff_cache/",
]
ENTRYPOINT_MODULE = "safemerge.cluster.job"


def ray_token() -> str | None:
    """This machine's Ray token, where Ray's documentation puts it: RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH
    names, or ~/.ray/auth_token; None when there is none, or when RAY_AUTH_MODE turns authentication off."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    return path.read_text().strip() if path.is_file() else None


def job_client(address: str):
    """A `JobSubmissionClient` for the dashboard at `address`; one clear error when it does not answer.

    With a token at hand it authenticates as `ray job submit` does on a cluster with token authentication (the
    default of a recent Ray): the token goes in the standard bearer header, which works however early this
    process imported Ray. RAY_AUTH_MODE is left as it is: Ray reads it once per process, so setting it here
    would make a later local `ray.init()` start a token-authenticated GCS that this process cannot reach."""
    token = ray_token()
    from ray.job_submission import JobSubmissionClient

    if "://" not in address:
        address = f"http://{address}"
    headers = {"Authorization": f"Bearer {token}"} if token is not None else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except Exception as error:  # noqa: BLE001 - connection refused, DNS, auth: one line naming the address
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(
            f"no Ray job server answers at {address} ({reason}); start one with `safemerge cluster up` "
            "or pass the dashboard address of your cluster"
        ) from None


def runtime_env(working_dir: Path, env_vars: dict[str, str] | None = None) -> dict:
    return {"working_dir": str(working_dir), "excludes": RUNTIME_ENV_EXCLUDES, "env_vars": dict(env_vars or {})}


def search_entrypoint(config: dict, extra_args: list[str] | None = None) -> str:
    """`python -m safemerge.cluster.job` with the whole config inline (the job sees no file of the submitter's)."""
    command = ["python", "-m", ENTRYPOINT_MODULE, "--config-json", json.dumps(config, sort_keys=True)]
    return shlex.join(command + list(extra_args or []))
