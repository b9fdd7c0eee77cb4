"""The `safemerge` command line: one sub-command per user task, each with --help.

Bad input ends with one line on stderr that names the input and the fix, and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from cluster.cli import add_commands as add_cluster_commands
from common.errors import UserError
from merges.cli import add_commands as add_merge_commands


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
    from zoo.build import MODEL_NAMES, ZooSpec, build_zoo, ensure_zoo

    spec = ZooSpec() if args.scale == 1.0 else ZooSpec().scaled(args.scale)
    models = args.models.split(",") if args.models else MODEL_NAMES
    if args.reuse:
        ensure_zoo(args.out, seed=args.seed, spec=spec, models=models)
        return
    build_zoo(args.out, seed=args.seed, spec=spec, force=args.force, models=models)


def _cmd_data_generate(args: argparse.Namespace) -> None:
    if args.generator is not None:
        _generate_with_models(args)
        return
    from evaluators import synthetic

    if args.reuse:
        manifest = synthetic.ensure_datasets(args.out, args.seed)
    else:
        sets = synthetic.generate_datasets(args.seed)
        manifest = synthetic.manifest_for(sets, args.seed)
        synthetic.save_datasets(sets, args.out, manifest, force=args.force)
    for name, counts in manifest["counts"].items():
        print(f"  {name:8s} " + "  ".join(f"{split} {count:4d}" for split, count in counts.items()))
    print(f"data written -> {args.out}")


def _parse_experts(specs: Sequence[str]) -> dict[str, Path]:
    experts = {}
    for spec in specs:
        domain, _, path = spec.partition("=")
        if not domain or not path:
            raise UserError(f"--expert {spec!r} must look like DOMAIN=PATH, for example medical=artifacts/zoo/medical")
        experts[domain] = Path(path)
    return experts


def _generate_with_models(args: argparse.Namespace) -> None:
    """The paper's pipeline: a generator model, a pool of answering models, experts for the domain data."""
    import json

    from common.fsutil import check_output_dir
    from evaluators import synthetic
    from evaluators.generation import check_model_dir, open_backend
    from evaluators.objectives import open_judge
    from evaluators.pipeline import PipelineSettings, load_examples, run_pipeline

    experts = _parse_experts(args.expert)
    if not args.pool:
        raise UserError("--pool needs at least one model folder that answers (and refuses) the harmful questions")
    for path in [args.generator, *args.pool, *experts.values()]:
        check_model_dir(path)
    check_output_dir(args.out, args.force)
    examples = load_examples(args.examples, list(experts), args.seed)
    engines: dict[Path, object] = {}

    def engine(path: Path):  # one engine per folder, shared by the roles it plays
        key = path.resolve()
        if key not in engines:
            engines[key] = open_backend(args.backend, path)
        return engines[key]

    judge = open_judge(args.judge, args.backend)
    try:
        sets, report = run_pipeline(
            engine(args.generator),
            {path.name: engine(path) for path in args.pool},
            {domain: engine(path) for domain, path in experts.items()},
            judge,
            examples,
            PipelineSettings(seed=args.seed),
        )
    finally:
        judge.close()
        for backend in engines.values():
            backend.close()
    print(json.dumps(report["steps"], indent=2))
    if sets is None:
        raise UserError(
            f"the pipeline left {', '.join(report['empty'])} empty (counts above); use a stronger "
            "--generator, more --pool models, or the templated generator (no --generator)"
        )
    synthetic.save_datasets(sets, args.out, report, force=args.force)
    print(f"data written -> {args.out}")


def _cmd_eval(args: argparse.Namespace) -> None:
    import json

    from evaluators.objectives import OBJECTIVE_DIRECTIONS, evaluate_model_dir

    metrics = evaluate_model_dir(
        args.model_dir,
        args.data,
        split=args.split,
        judge=args.judge,
        backend=args.backend,
        limit=args.limit,
        alpha=args.alpha,
        with_ce=not args.no_ce,
        ce_backend=args.ce_backend,
    )
    print(f"{args.model_dir} on the {args.split} split ({args.backend}, judge {args.judge})")
    notes = {"max": "higher is better", "min": "lower is better"}
    for name, value in metrics.items():
        print(f"  {name:16s} {value:10.4f}  {notes.get(OBJECTIVE_DIRECTIONS.get(name, ''), '')}")
    print(json.dumps(metrics))


def add_override_options(parser: argparse.ArgumentParser) -> None:
    """The options that override a search config's fields (search run, search compare, cluster.job)."""
    parser.add_argument("--name", help="override the search name (also the Optuna study name)")
    parser.add_argument("--trials", type=whole_number, help="override the trial budget")
    parser.add_argument("--sampler", choices=["nsga2", "tpe", "gp", "random", "grid", "cmaes"], help="override")
    parser.add_argument("--workers", type=whole_number, help="override the number of worker actors")
    parser.add_argument("--seed", type=whole_number, help="override the seed")
    parser.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override any config field, dotted, e.g. --set evaluation.limit=20 (repeatable)",
    )


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

        overrides[key] = yaml.safe_load(value)
    return overrides


def _cmd_search_run(args: argparse.Namespace) -> None:
    from search.config import load_config
    from search.run import execute, format_front

    config = load_config(args.config, config_overrides(args))
    summary = execute(config)
    print(format_front(summary))


def _cmd_search_resume(args: argparse.Namespace) -> None:
    from search.driver import load_search_config
    from search.run import execute, format_front

    summary = execute(load_search_config(args.name, args.results_dir))
    print(format_front(summary))


def _cmd_search_compare(args: argparse.Namespace) -> None:
    from search.compare import compare, format_comparison
    from search.config import load_config

    config = load_config(args.config, config_overrides(args))
    print(format_comparison(compare(config, grid_trials=args.grid_trials, domain_only_trials=args.domain_only_trials)))


def _cmd_pareto(args: argparse.Namespace) -> None:
    from search.run import format_front, load_summary

    summary = load_summary(args.name, args.results_dir)
    if args.json:
        import json

        print(json.dumps(summary, indent=2))
    else:
        print(format_front(summary))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="safemerge", description="Search for merges of expert LLMs that keep safety alignment.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    zoo = commands.add_parser("zoo", help="the tiny trained model family used by the default run")
    zoo_commands = zoo.add_subparsers(dest="zoo_command", required=True, metavar="COMMAND")
    build = zoo_commands.add_parser(
        "build",
        help="train base, aligned, medical, finance and guard on the CPU (about 9 minutes on 2 cores)",
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
    build.add_argument(
        "--models",
        metavar="NAME,NAME",
        help="build only these models (and base), e.g. base,aligned,medical; each gets the weights of a full build",
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
    pipeline = generate.add_argument_group(
        "model-written data (the paper's pipeline; without --generator the templated generator runs)"
    )
    pipeline.add_argument("--generator", type=Path, help="model folder that writes the harmful questions")
    pipeline.add_argument(
        "--pool",
        type=Path,
        nargs="*",
        default=[],
        help="model folders that answer them; one refusal per question is kept",
    )
    pipeline.add_argument(
        "--expert",
        action="append",
        default=[],
        metavar="DOMAIN=PATH",
        help="an expert that writes and answers its domain's questions (repeatable)",
    )
    pipeline.add_argument(
        "--examples",
        type=Path,
        help="JSON {domain: [example questions]} for domains the templated generator does not know",
    )
    pipeline.add_argument("--judge", default="refusal", help="'refusal' or 'guard:PATH' (default: refusal)")
    pipeline.add_argument("--backend", choices=["vllm", "hf"], default="vllm", help="generation backend")
    generate.set_defaults(handler=_cmd_data_generate)

    evaluate = commands.add_parser(
        "eval",
        help="score a model folder: safety, over-refusal, domain accuracy, cross-entropies",
        description="Generate greedily on a split of the data sets and score the answers. Prints a table and, "
        "as its last line, the metrics as JSON.",
    )
    evaluate.add_argument("model_dir", type=Path, help="a Hugging Face model folder (an expert, a merge)")
    evaluate.add_argument("--data", type=Path, required=True, help="a folder written by `safemerge data generate`")
    evaluate.add_argument("--split", choices=["dev", "test"], default="dev", help="which split (default: dev)")
    evaluate.add_argument(
        "--judge", default="refusal", help="'refusal' (keyword judge) or 'guard:PATH' (a Llama Guard model folder)"
    )
    evaluate.add_argument(
        "--backend", choices=["vllm", "hf"], default="vllm", help="generation backend (default: vllm)"
    )
    evaluate.add_argument("--limit", type=whole_number, default=None, help="only the first N prompts of each set")
    evaluate.add_argument(
        "--alpha",
        type=float,
        default=0.3,
        help="weight of ce_domain in combined = ce_safety + alpha * ce_domain (default: 0.3)",
    )
    evaluate.add_argument("--no-ce", action="store_true", help="skip the teacher-forced cross-entropies")
    evaluate.add_argument(
        "--ce-backend",
        choices=["auto", "vllm", "hf"],
        default="auto",
        help="where the cross-entropies run: auto picks transformers on the CPU (faster "
        "there) and vLLM on a GPU (no second copy of the weights)",
    )
    evaluate.set_defaults(handler=_cmd_eval)

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
    run.set_defaults(handler=_cmd_search_run)
    comparison = search_commands.add_parser(
        "compare",
        help="the paper's table: aligned, experts, grid, LM-Cocktail, domain-only and full searches",
        description="Score the aligned model and each expert, the LM-Cocktail merge, the grid-search merge, the "
        "merge of a search on domain data only, and the merge of the full search, all on the test split.",
    )
    comparison.add_argument("config", type=Path, help="a search config, e.g. configs/zoo.yaml")
    add_override_options(comparison)
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
    resume.add_argument("--results-dir", type=Path, default=Path("artifacts/searches"), help="where searches live")
    resume.set_defaults(handler=_cmd_search_resume)

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
    add_merge_commands(commands)
    add_cluster_commands(commands)
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
