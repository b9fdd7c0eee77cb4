"""The `safemerge search run | plan | compare | resume | sync`, `safemerge pareto` and `safemerge pick` sub-commands,
and the options that override a search config's fields (shared with the Ray job entrypoint)."""

from __future__ import annotations

import argparse
from pathlib import Path

from safemerge.arguments import whole_number
from safemerge.errors import UserError
from safemerge.search.samplers import SAMPLER_NAMES


def add_override_options(parser: argparse.ArgumentParser) -> None:
    """The options that override a search config's fields (search run, search compare, the Ray job entrypoint)."""
    parser.add_argument("--name", help="override the search name (also the Optuna study name)")
    parser.add_argument("--trials", type=whole_number, help="override the trial budget")
    parser.add_argument("--sampler", choices=SAMPLER_NAMES, help="override")
    parser.add_argument("--workers", type=whole_number, help="override the number of worker actors")
    parser.add_argument("--seed", type=whole_number, help="override the seed")
    parser.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override any config field, dotted, e.g. --set evaluation.limit=20 (repeatable)",
    )


def add_verbose_option(parser: argparse.ArgumentParser) -> None:
    """--verbose: the libraries' own output (Ray Tune's status tables, Optuna's and vLLM's info lines, MLflow's
    run links, the workers' output) besides the search's progress."""
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="also show the libraries' own output (Ray Tune, Optuna, MLflow, vLLM, the workers'), off by default",
    )


def quiet_unless_verbose(args: argparse.Namespace) -> None:
    from safemerge.search.progress import quiet_libraries

    quiet_libraries(verbose=args.verbose)


def config_overrides(args: argparse.Namespace) -> dict:
    pairs = {
        "trials": args.trials,
        "sampler": args.sampler,
        "name": args.name,
        "workers.count": args.workers,
        "seed": args.seed,
    }
    overrides = {key: value for key, value in pairs.items() if value is not None}
    for item in args.set or []:
        key, _, value = item.partition("=")
        if not key or not _:
            raise UserError(f"--set {item!r} must look like KEY=VALUE, for example evaluation.limit=20")
        import yaml

        try:
            overrides[key] = yaml.safe_load(value)
        except yaml.YAMLError as error:  # `>= 0.5` reads as a YAML block scalar: one line, and the fix
            reason = str(error).splitlines()[0]
            raise UserError(
                f"--set {item!r}: the value is not YAML ({reason}); quote it, for example {key}='{value}'"
            ) from None
    return overrides


def _cmd_search_run(args: argparse.Namespace) -> None:
    quiet_unless_verbose(args)
    from safemerge.search.config import load_config
    from safemerge.search.plan import check_worker_memory

    config = load_config(args.config, config_overrides(args))
    check_worker_memory(config)  # refuses a worker that does not fit before anything loads (or Ray is imported)
    from safemerge.search.run import execute, format_front

    summary = execute(config)
    print(format_front(summary))


def _gib_amount(text: str) -> float:
    try:
        amount = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of GiB such as 80 or 79.2, got {text!r}") from None
    if not amount > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 GiB, got {text!r}")
    return amount


def _cmd_search_plan(args: argparse.Namespace) -> None:
    from safemerge.search.config import load_config
    from safemerge.search.plan import GIB, check_plan, format_plan, plan_worker

    config = load_config(args.config, config_overrides(args))
    plan = plan_worker(
        config,
        gpu_memory_bytes=None if args.gpu_memory_gib is None else int(args.gpu_memory_gib * GIB),
        host_memory_bytes=None if args.host_memory_gib is None else int(args.host_memory_gib * GIB),
    )
    if args.json:
        import json

        print(json.dumps(plan.to_json(), indent=2))
    else:
        print(format_plan(plan))
    check_plan(plan)  # exit code 2 with the one-line refusal


def _cmd_search_resume(args: argparse.Namespace) -> None:
    quiet_unless_verbose(args)
    from safemerge.search.driver import load_search_config
    from safemerge.search.plan import check_worker_memory
    from safemerge.search.run import execute, format_front

    config = load_search_config(args.name, args.results_dir, {} if args.trials is None else {"trials": args.trials})
    check_worker_memory(config)
    summary = execute(config)
    print(format_front(summary))


def _cmd_search_sync(args: argparse.Namespace) -> None:
    from safemerge.search.driver import load_search_config
    from safemerge.search.run import sync

    sync(load_search_config(args.name, args.results_dir))


def _cmd_search_compare(args: argparse.Namespace) -> None:
    quiet_unless_verbose(args)
    from safemerge.search.config import load_config
    from safemerge.search.plan import check_worker_memory

    config = load_config(args.config, config_overrides(args))
    check_worker_memory(config)
    from safemerge.search.compare import compare, format_comparison

    print(format_comparison(compare(config, grid_trials=args.grid_trials, domain_only_trials=args.domain_only_trials)))


def _cmd_pareto(args: argparse.Namespace) -> None:
    from safemerge.search.run import format_front, load_summary

    summary = load_summary(args.name, args.results_dir)
    if args.json:
        import json

        print(json.dumps(summary, indent=2))
    else:
        print(format_front(summary))


def _cmd_pick(args: argparse.Namespace) -> None:
    from safemerge.search.pick import pick

    pick(args.name, args.trial, args.alias, args.results_dir)


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register `search`, `pareto` and `pick` on the `safemerge` parser."""
    search = commands.add_parser("search", help="run or resume a merge search (Ray Tune + Optuna + MLflow)")
    search_commands = search.add_subparsers(dest="search_command", required=True, metavar="COMMAND")
    run = search_commands.add_parser(
        "run",
        help="search a config's merge space, then test, register and print the Pareto front",
        description="Tune merge recipes on the dev split with Ray Tune + Optuna, track every trial in MLflow, then "
        "evaluate the feasible Pareto front on the test split and register those merges.",
    )
    run.add_argument("config", type=Path, help="a search config, e.g. configs/zoo.yaml")
    add_override_options(run)
    add_verbose_option(run)
    run.set_defaults(handler=_cmd_search_run)
    plan = search_commands.add_parser(
        "plan",
        help="the memory plan of one worker: GPU and host bytes, and whether it fits (exit code 2 when not)",
        description="From the models' config.json files and safetensors headers only (no weights are read or "
        "downloaded), print what one worker holds on its GPU and in host memory: the vLLM generator (weights at the "
        "checkpoint's dtype, KV cache, overhead), the Llama Guard judge, the merge store and its scratch, where the "
        "store lives, and the vLLM options the worker starts its engines with. `search run` checks the same plan "
        "first.",
    )
    plan.add_argument("config", type=Path, help="a search config, e.g. configs/llama3-medical.yaml")
    add_override_options(plan)
    plan.add_argument(
        "--gpu-memory-gib",
        type=_gib_amount,
        help="one worker's GPU memory (default: workers.gpu_memory_gib, else this machine's CUDA device)",
    )
    plan.add_argument(
        "--host-memory-gib",
        type=_gib_amount,
        help="one worker's machine memory (default: workers.host_memory_gib, else this machine's)",
    )
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(handler=_cmd_search_plan)
    comparison = search_commands.add_parser(
        "compare",
        help="the paper's table: aligned, experts, grid, LM-Cocktail, domain-only and full searches",
        description="Score the aligned model and each expert, the LM-Cocktail merge, the grid-search merge, the "
        "merge of a search on domain data only, and the merge of the full search, all on the test split.",
    )
    comparison.add_argument("config", type=Path, help="a search config, e.g. configs/zoo.yaml")
    add_override_options(comparison)
    add_verbose_option(comparison)
    comparison.add_argument("--grid-trials", type=whole_number, default=9, help="grid points tried (of 25)")
    comparison.add_argument(
        "--domain-only-trials", type=whole_number, help="budget of the domain-only search (default: the config's)"
    )
    comparison.set_defaults(handler=_cmd_search_compare)
    resume = search_commands.add_parser(
        "resume",
        help="continue an interrupted search to its budget",
        description="Continue a search whose driver stopped: finished trials are kept, interrupted ones re-run.",
    )
    resume.add_argument("name", help="the search name")
    resume.add_argument("--trials", type=whole_number, help="raise the trial budget (default: the search's own)")
    resume.add_argument("--results-dir", type=Path, default=Path("artifacts/searches"), help="where searches live")
    add_verbose_option(resume)
    resume.set_defaults(handler=_cmd_search_resume)
    sync = search_commands.add_parser(
        "sync",
        help="mirror a search to MLflow: every finished trial, and the finalized front's registry versions",
        description="The Optuna study is a search's record and MLflow its mirror. When MLflow did not answer during "
        "a search (it goes on without it), this logs what MLflow lacks: a child run per finished trial (a run cut "
        "off mid-logging is logged again), the front's tags, test metrics and artifacts, and a registry version per "
        "front entry. Running it again adds nothing. Resume and finalize do the same on their own.",
    )
    sync.add_argument("name", help="the search name")
    sync.add_argument("--results-dir", type=Path, default=Path("artifacts/searches"), help="where searches live")
    sync.set_defaults(handler=_cmd_search_sync)

    pareto = commands.add_parser(
        "pareto",
        help="print a finished search's Pareto front with test metrics",
        description="Print the feasible Pareto front, its test-split metrics and the "
        "registered model names and aliases.",
    )
    pareto.add_argument("name", help="the search name")
    pareto.add_argument("--results-dir", type=Path, default=Path("artifacts/searches"), help="where searches live")
    pareto.add_argument("--json", action="store_true", help="print the whole summary as JSON")
    pareto.set_defaults(handler=_cmd_pareto)

    pick = commands.add_parser(
        "pick",
        help="register a front trial you chose (in the MLflow UI) with its weights, under an alias",
        description="Materialize the merge of a finalized search's front trial (if not yet), register it with its "
        "weights in MLflow's transformers flavour (or reuse its version with weights), set the alias on it and print "
        "how to load it. Running it again adds nothing.",
    )
    pick.add_argument("name", help="the search name")
    pick.add_argument(
        "trial", type=whole_number, help="the trial number, as the front table and `safemerge pareto` show it"
    )
    pick.add_argument("--alias", default="production", help="the registry alias to set (default: production)")
    pick.add_argument("--results-dir", type=Path, default=Path("artifacts/searches"), help="where searches live")
    pick.set_defaults(handler=_cmd_pick)
