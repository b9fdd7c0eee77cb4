"""Credentials a search needs but must never write down: the Optuna storage's password and the MLflow server's.

A password in a config's `storage:` URL is taken out when the config is parsed: the config, and so everything
made from it (config.yaml in the search folder, the MLflow params and config.json, Ray Tune's pickles, the
workers' config, log lines, a Ray job's entrypoint), holds the URL without it. The password stays in this
process only and reaches the database driver as a connect argument. A process that did not parse it (a resume
from config.yaml, a Ray job) takes it from SAFEMERGE_STORAGE_PASSWORD. Credentials in an MLflow URL
(`https://USER:PASSWORD@HOST`) move to MLflow's own MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

if TYPE_CHECKING:
    import optuna

STORAGE_PASSWORD_ENV = "SAFEMERGE_STORAGE_PASSWORD"
MLFLOW_CREDENTIAL_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")

_storage_passwords: dict[str, str] = {}  # password-free storage URL -> password, this process only


def without_storage_password(url: str) -> str:
    """`url` without its password, which this process keeps for `rdb_storage`; a URL without one is unchanged."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        return url  # not an RDB URL: the config's own check says so
    if parsed.password is None:
        return url
    # URL.set(password=None) keeps the password (None there means "unchanged"): built anew without it.
    bare = URL.create(
        parsed.drivername, parsed.username, None, parsed.host, parsed.port, parsed.database, parsed.query
    ).render_as_string(hide_password=False)
    _storage_passwords[bare] = str(parsed.password)
    return bare


def storage_password(url: str) -> str | None:
    return _storage_passwords.get(url) or os.environ.get(STORAGE_PASSWORD_ENV) or None


class ConnectArgs(dict):
    """The driver's connect arguments for one storage URL; pickled as the URL alone, so the password is looked up
    again where it is unpickled and never written into a pickle."""

    def __init__(self, url: str) -> None:
        password = storage_password(url)
        super().__init__({"password": password} if password is not None else {})
        self.url = url

    def __reduce__(self):
        return ConnectArgs, (self.url,)


def rdb_storage(url: str) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage at a password-free `url`, connecting with the password this process knows."""
    import optuna

    engine_kwargs = {} if url.startswith("sqlite") else {"connect_args": ConnectArgs(url)}
    return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)


def without_mlflow_credentials(uri: str) -> str:
    """An http(s) MLflow URI without USER:PASSWORD@, which go to MLflow's environment variables instead."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or parts.password is None and parts.username is None:
        return uri
    for name, value in zip(MLFLOW_CREDENTIAL_ENV, (parts.username, parts.password), strict=True):
        if value is not None:
            os.environ[name] = value
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def secret_environment(storage: str) -> dict[str, str]:
    """What a process of this search elsewhere (a Ray job) needs in its environment for the secrets taken out."""
    env = {name: os.environ[name] for name in MLFLOW_CREDENTIAL_ENV if os.environ.get(name)}
    password = storage_password(storage)
    if password is not None:
        env[STORAGE_PASSWORD_ENV] = password
    return env
