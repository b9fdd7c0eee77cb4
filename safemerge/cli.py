"""The `safemerge` command line: the root parser composes each layer's sub-commands, each with --help.

Bad input ends with one line on stderr that names the input and the fix, and exit code 2.
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Sequence

from safemerge.arguments import Parser
from safemerge.cluster import cli as cluster_cli
from safemerge.errors import UserError
from safemerge.evaluators import cli as evaluators_cli
from safemerge.merges import cli as merges_cli
from safemerge.search import cli as search_cli
from safemerge.zoo import cli as zoo_cli

# In the order `safemerge --help` lists them: the data a search needs, then searching, then deployment.
LAYER_COMMANDS = (zoo_cli, evaluators_cli, search_cli, merges_cli, cluster_cli)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="safemerge", description="Search for merges of expert LLMs that keep safety alignment.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND")
    for layer in LAYER_COMMANDS:
        layer.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Progress lines of long work reach a pipe (tee, a job's log, a test) as they happen, not at exit.
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)
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
