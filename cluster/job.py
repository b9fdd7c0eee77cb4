"""The Ray job entrypoint: one search on the cluster the job runs in.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m safemerge.cluster.job --config configs/zoo.yaml

The job runs in an uploaded copy of the code, so relative paths in the config (zoo, data, results, sqlite
stores) are anchored to the project folder: --home, else $SAFEMERGE_HOME (set by `safemerge cluster up`),
else the working directory. The tracking server is --mlflow-uri, else $MLFLOW_TRACKING_URI, else the
config's. The zoo and the data are built there when missing (cached after). Exit code 0 when the search
finished, 1 when it failed, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from safemerge.cluster.jobs import ENTRYPOINT_MODULE
from safemerge.cluster.local import HOME_ENV
from safemerge.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    from safemerge.arguments import Parser
    from safemerge.search.cli import add_override_options, add_verbose_option

    parser = Parser(
        prog=f"python -m {ENTRYPOINT_MODULE}",
        description=f"Run one merge search as a Ray job (submit it with `ray job submit ... -- python -m "
        f"{ENTRYPOINT_MODULE}`).",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", type=Path, help="a search config inside the uploaded working dir")
    source.add_argument("--config-json", help="the whole config as JSON (what `safemerge nightly` submits)")
    parser.add_argument(
        "--home",
        type=Path,
        default=None,
        help="project folder that relative config paths refer to (default: $SAFEMERGE_HOME, else the cwd)",
    )
    parser.add_argument(
        "--mlflow-uri", default=None, help="tracking server (default: $MLFLOW_TRACKING_URI, else the config's)"
    )
    parser.add_argument(
        "--name-by-release",
        action="store_true",
        help="pin every hub model to its current commit and name the search after the models' releases, so a "
        "scheduled job searches each new release once (the same releases again only re-finalize, which changes "
        "nothing)",
    )
    parser.add_argument(
        "--storage",
        default=None,
        help="Optuna storage URL, e.g. postgresql://... on a multi-node cluster "
        "(default: $SAFEMERGE_OPTUNA_STORAGE, else the config's)",
    )
    add_override_options(parser)
    add_verbose_option(parser)
    return parser


def job_config(args: argparse.Namespace):
    """The config the job runs: file or inline JSON, overrides, anchored to the project folder."""
    from safemerge.search.cli import config_overrides
    from safemerge.search.config import load_config, parse_config

    overrides = config_overrides(args)
    mlflow_uri = args.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if mlflow_uri:
        overrides["mlflow.tracking_uri"] = mlflow_uri
    storage = args.storage or os.environ.get("SAFEMERGE_OPTUNA_STORAGE")
    if storage:
        overrides["storage"] = storage
    if args.config is not None:
        config = load_config(args.config, overrides)
    else:
        try:
            data = json.loads(args.config_json)
        except json.JSONDecodeError as error:
            raise UserError(f"--config-json is not valid JSON ({error})") from None
        config = parse_config(data, "--config-json", overrides)
    home = args.home or Path(os.environ.get(HOME_ENV) or Path.cwd())
    if not Path(home).is_dir():
        raise UserError(f"--home {home} is not a folder; pass the project folder that holds artifacts/")
    return config.anchored(home)


def named_by_release(config):
    """The config with hub models pinned to their current commits and `-RELEASE` (8 hex digits over every model's
    release id) added to its name."""
    import hashlib

    from safemerge.search.config import SearchConfig
    from safemerge.search.model_sources import pinned_reference, release_id

    data = config.model_dump(mode="json")
    models = data["models"]
    references = {"base": models["base"], "aligned": models["aligned"], **models["experts"]}
    if models.get("guard"):
        references["guard"] = models["guard"]
    pinned = {role: pinned_reference(reference) for role, reference in references.items()}
    for role in ("base", "aligned", "guard"):
        if role in pinned:
            models[role] = pinned[role]
    models["experts"] = {domain: pinned[domain] for domain in models["experts"]}
    digest = hashlib.sha256()
    for role, reference in sorted(pinned.items()):
        digest.update(f"{role}={release_id(reference, config.zoo_dir)}\n".encode())
    data["name"] = f"{config.name}-{digest.hexdigest()[:8]}"
    return SearchConfig.model_validate(data)


def prepare_inputs(config, log=print) -> None:
    """Build the zoo where the config names zoo models, refuse a worker that does not fit its GPU or machine (the
    memory plan, from the models' headers: before the data is written or any worker starts), then build the data;
    what is there already is kept."""
    from safemerge.evaluators.synthetic import ensure_datasets
    from safemerge.search.plan import check_worker_memory

    models = config.models
    # Only the zoo models the search uses: the guard only when it is the judge.
    references = [models.base, models.aligned, *models.experts.values()]
    if config.evaluation.judge.startswith("guard"):
        references.append(models.guard)
    zoo_models = sorted({ref.removeprefix("zoo:") for ref in references if ref and ref.startswith("zoo:")})
    if zoo_models:
        from safemerge.zoo.build import ensure_zoo

        ensure_zoo(config.zoo_dir, seed=config.seed, log=log, models=zoo_models)
    check_worker_memory(config, log=log)
    ensure_datasets(config.data, config.seed, log=log)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from safemerge.search.cli import quiet_unless_verbose

    quiet_unless_verbose(args)
    try:
        config = job_config(args)
        print(f"{ENTRYPOINT_MODULE}: search {config.name!r}, {config.trials} trials, workers: {config.workers.count}")
        print(f"{ENTRYPOINT_MODULE}: MLflow {config.mlflow.tracking_uri}, Optuna {config.storage}", flush=True)
        prepare_inputs(config)
        if args.name_by_release:
            config = named_by_release(config)
            print(f"{ENTRYPOINT_MODULE}: search {config.name!r}, named by its models' releases", flush=True)
        from safemerge.search.run import execute, format_front

        summary = execute(config)
        print(format_front(summary))
        print(f"{ENTRYPOINT_MODULE}: MLflow run {summary['mlflow_run']}")
    except UserError as error:
        print(f"{ENTRYPOINT_MODULE}: error: {error}", file=sys.stderr)
        return 2
    except Exception:  # noqa: BLE001 - the job fails with the traceback in its logs and exit code 1
        traceback.print_exc()
        print(f"{ENTRYPOINT_MODULE}: the search failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
