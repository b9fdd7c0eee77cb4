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


def use_ray_token_if_present() -> None:
    """Turn on Ray's token authentication for this process when a token is at hand (RAY_AUTH_TOKEN,
    RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) and RAY_AUTH_MODE is not set: what `ray start` does, so a client
    reaches a cluster that a recent Ray started with token authentication on by default. Ray reads the mode
    from its documented environment variable; nothing of Ray's internals is called."""
    if os.environ.get("RAY_AUTH_MODE"):
        return
    token_path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or Path(token_path).is_file():
        os.environ["RAY_AUTH_MODE"] = "token"


def job_client(address: str):
    """A `JobSubmissionClient` for the dashboard at `address`; one clear error when it does not answer."""
    from ray.job_submission import JobSubmissionClient

    use_ray_token_if_present()
    if "://" not in address:
        address = f"http://{address}"
    try:
        return JobSubmissionClient(address)
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
