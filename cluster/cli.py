"""The `safemerge cluster up | status | down` and `safemerge nightly` sub-commands."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from safemerge.errors import UserError

DEFAULT_STATE_DIR = Path("artifacts/cluster")


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a port number such as 8265, got {text!r}") from None
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"must be between 1 and 65535, got {port}")
    return port


def _cmd_cluster_up(args: argparse.Namespace) -> None:
    from safemerge.cluster.jobs import ENTRYPOINT_MODULE
    from safemerge.cluster.local import ClusterOptions, up

    options = ClusterOptions(
        host=args.host,
        ray_port=args.ray_port,
        dashboard_port=args.dashboard_port,
        mlflow_port=args.mlflow_port,
        agent_port=args.agent_port,
        state_dir=args.state_dir,
        num_cpus=args.num_cpus,
        num_gpus=args.num_gpus,
    )
    state = up(options)
    print(f"cluster up; state in {args.state_dir}. Submit a search with:")
    print("  export RAY_AUTH_MODE=token   # the head uses Ray's token authentication (token in ~/.ray/auth_token)")
    print(
        f"  ray job submit --address {state['dashboard_url']} --working-dir . -- "
        f"python -m {ENTRYPOINT_MODULE} --config configs/zoo.yaml"
    )
    print(f"MLflow UI: {state['mlflow_url']}; stop everything with `safemerge cluster down`")


def _cmd_cluster_status(args: argparse.Namespace) -> None:
    from safemerge.cluster.local import format_status, status

    report = status(args.state_dir)
    print(json.dumps(report, indent=2) if args.json else format_status(report))
    if report["services"] and not report["running"]:
        sys.exit(1)


def _cmd_cluster_down(args: argparse.Namespace) -> None:
    from safemerge.cluster.local import down

    down(args.state_dir)


def _cmd_nightly(args: argparse.Namespace) -> None:
    from safemerge.cluster.nightly import run_nightly

    submitted = run_nightly(
        args.releases,
        args.config,
        args.address,
        args.state,
        domain=args.domain,
        mlflow_uri=args.mlflow_uri,
        wait=args.wait,
        lock_timeout=args.lock_timeout,
        settle_s=args.settle_s,
    )
    failed = [record for record in submitted if record.get("job_status") not in (None, "SUCCEEDED")]
    if failed:
        raise UserError(f"{len(failed)} search jobs did not succeed: {[r['submission_id'] for r in failed]}")


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register `cluster` and `nightly` on the `safemerge` parser."""
    cluster = commands.add_parser("cluster", help="a local Ray head and MLflow server to submit searches to")
    cluster_commands = cluster.add_subparsers(dest="cluster_command", required=True, metavar="COMMAND")
    start = cluster_commands.add_parser(
        "up",
        help="start a Ray head and an MLflow server on loopback and wait until both answer",
        description="Start a Ray head (job submission on the dashboard port) and an MLflow server (sqlite "
        "store and artifacts under --state-dir), wait until both answer, and record their process ids.",
    )
    start.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, loopback only)")
    start.add_argument("--ray-port", type=_port, default=6379, help="Ray GCS port (default: 6379)")
    start.add_argument("--dashboard-port", type=_port, default=8265, help="dashboard and job API (default: 8265)")
    start.add_argument("--mlflow-port", type=_port, default=5000, help="MLflow server port (default: 5000)")
    start.add_argument(
        "--agent-port", type=_port, default=52365, help="the head's dashboard agent, which runs jobs (default: 52365)"
    )
    start.add_argument("--num-cpus", type=int, default=None, help="CPUs the head offers (default: all)")
    start.add_argument("--num-gpus", type=int, default=None, help="GPUs the head offers (default: all)")
    start.set_defaults(handler=_cmd_cluster_up)
    report = cluster_commands.add_parser("status", help="whether the recorded services run and answer")
    report.add_argument("--json", action="store_true", help="print the status as JSON")
    report.set_defaults(handler=_cmd_cluster_status)
    stop = cluster_commands.add_parser("down", help="stop exactly the processes `cluster up` started")
    stop.set_defaults(handler=_cmd_cluster_down)
    for command in (start, report, stop):
        command.add_argument(
            "--state-dir",
            type=Path,
            default=DEFAULT_STATE_DIR,
            help=f"where the cluster's record, logs and MLflow store live (default: {DEFAULT_STATE_DIR})",
        )

    from safemerge.cluster.nightly import SETTLE_S

    nightly = commands.add_parser(
        "nightly",
        help="submit one search job per expert release not searched yet (run it from cron)",
        description="Look for expert releases not yet searched, fill each into the template config as its "
        "expert, submit one search job per release to the Ray cluster, and record it in the state file. "
        "Idempotent: a release is submitted once, also with two watchers at once or after a crash.",
    )
    nightly.add_argument(
        "--releases",
        required=True,
        help="a folder with one model folder per release, or hf:ORG/NAME[@REVISION] for a hub repo",
    )
    nightly.add_argument("--config", type=Path, required=True, help="template search config, e.g. configs/zoo.yaml")
    nightly.add_argument(
        "--address", default="http://127.0.0.1:8265", help="Ray dashboard address (default: http://127.0.0.1:8265)"
    )
    nightly.add_argument("--state", type=Path, required=True, help="JSON file of the releases already submitted")
    nightly.add_argument("--domain", help="which expert of the template the release replaces (if it has several)")
    nightly.add_argument("--mlflow-uri", help="override the template's MLflow tracking URI")
    nightly.add_argument("--wait", action="store_true", help="wait for the submitted jobs; fail if one fails")
    nightly.add_argument(
        "--lock-timeout", type=float, default=600.0, help="seconds to wait for another watcher (default: 600)"
    )
    nightly.add_argument(
        "--settle-s",
        type=float,
        default=SETTLE_S,
        help=f"skip a release folder with a file changed this many seconds ago or less: it is still being copied "
        f"(default: {SETTLE_S:g})",
    )
    nightly.set_defaults(handler=_cmd_nightly)
