"""The `safemerge zoo build` sub-command: train the tiny model family on the CPU."""

from __future__ import annotations

import argparse
from pathlib import Path

from safemerge.arguments import add_seed


def _cmd_zoo_build(args: argparse.Namespace) -> None:
    from safemerge.files import check_output_dir

    check_output_dir(args.out, force=args.force or args.reuse)  # before the slow torch import
    from safemerge.zoo.build import MODEL_NAMES, ZooSpec, build_zoo, ensure_zoo

    spec = ZooSpec() if args.scale == 1.0 else ZooSpec().scaled(args.scale)
    models = args.models.split(",") if args.models else MODEL_NAMES
    if args.reuse:
        ensure_zoo(args.out, seed=args.seed, spec=spec, models=models)
        return
    build_zoo(args.out, seed=args.seed, spec=spec, force=args.force, models=models)


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register `zoo build` on the `safemerge` parser."""
    zoo = commands.add_parser("zoo", help="the tiny trained model family used by the default run")
    zoo_commands = zoo.add_subparsers(dest="zoo_command", required=True, metavar="COMMAND")
    build = zoo_commands.add_parser(
        "build",
        help="train base, aligned, medical, finance and guard on the CPU (about 9 minutes on 2 cores)",
        description="Train the zoo on the CPU and write one Hugging Face folder per model under --out.",
    )
    build.add_argument("--out", type=Path, required=True, help="folder to write the zoo into")
    add_seed(build)
    build.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    build.add_argument(
        "--reuse", action="store_true", help="keep --out as it is when it already holds a zoo of the same seed and spec"
    )
    build.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="scale every training step count (smoke tests only: a scaled zoo does not behave)",
    )
    build.add_argument(
        "--models",
        metavar="NAME,NAME",
        help="build only these models (and base), e.g. base,aligned,medical; each gets the weights of a full build",
    )
    build.set_defaults(handler=_cmd_zoo_build)
