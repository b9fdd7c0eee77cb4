"""The `safemerge` command line: one sub-command per user task, each with --help.

Bad input ends with one line on stderr that names the input and the fix, and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from common.errors import UserError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the fix instead of a usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number such as 0 or 1234, got {text!r}") from None


def _add_seed(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--seed", type=whole_number, default=0, help="random seed; the same seed gives the same output (default: 0)"
    )


def _cmd_zoo_build(args: argparse.Namespace) -> None:
    from common.fsutil import check_output_dir

    check_output_dir(args.out, force=args.force or args.reuse)  # before the slow torch import
    from zoo.build import ZooSpec, build_zoo, existing_zoo

    spec = ZooSpec() if args.scale == 1.0 else ZooSpec().scaled(args.scale)
    if args.reuse and (manifest := existing_zoo(args.out, spec, args.seed)) is not None:
        print(f"zoo at {args.out} is up to date (seed {args.seed}, built in {manifest['build_seconds']} s)")
        return
    build_zoo(args.out, seed=args.seed, spec=spec, force=args.force or args.reuse)


def _cmd_data_generate(args: argparse.Namespace) -> None:
    from evaluators import synthetic

    sets = synthetic.generate_datasets(args.seed)
    manifest = synthetic.manifest_for(sets, args.seed)
    if args.reuse and (args.out / synthetic.MANIFEST).is_file():
        _, existing = synthetic.load_datasets(args.out)
        if existing == manifest:
            print(f"data at {args.out} is up to date (seed {args.seed})")
            return
    synthetic.save_datasets(sets, args.out, manifest, force=args.force or args.reuse)
    for name, counts in manifest["counts"].items():
        print(f"  {name:8s} " + "  ".join(f"{split} {count:4d}" for split, count in counts.items()))
    print(f"data written -> {args.out}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="safemerge", description="Search for merges of expert LLMs that keep safety alignment.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    zoo = commands.add_parser("zoo", help="the tiny trained model family used by the default run")
    zoo_commands = zoo.add_subparsers(dest="zoo_command", required=True, metavar="COMMAND")
    build = zoo_commands.add_parser(
        "build",
        help="train base, aligned, medical, finance and guard on the CPU (about 5 minutes)",
        description="Train the zoo on the CPU and write one Hugging Face folder per model under --out.",
    )
    build.add_argument("--out", type=Path, required=True, help="folder to write the zoo into")
    _add_seed(build)
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
    build.set_defaults(handler=_cmd_zoo_build)

    data = commands.add_parser("data", help="synthetic safety, over-refusal and domain data sets")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    generate = data_commands.add_parser(
        "generate",
        help="write the templated data sets (train/dev/test splits)",
        description="Write harmful, benign (XSTest-like), medical and finance sets with train/dev/test splits.",
    )
    generate.add_argument("--out", type=Path, required=True, help="folder to write the data sets into")
    _add_seed(generate)
    generate.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    generate.add_argument("--reuse", action="store_true", help="keep --out when it already holds the same data")
    generate.set_defaults(handler=_cmd_data_generate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.handler(args)
    except UserError as error:
        print(f"safemerge: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("safemerge: interrupted; nothing half-written was left behind", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
