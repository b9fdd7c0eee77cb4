"""The `safemerge data generate`, `safemerge data import` and `safemerge eval` sub-commands: evaluation data sets
(generated or imported), and the scores of one model folder."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from safemerge.arguments import add_seed, whole_number
from safemerge.errors import UserError


def _cmd_data_generate(args: argparse.Namespace) -> None:
    if args.generator is not None:
        _generate_with_models(args)
        return
    from safemerge.evaluators import synthetic

    if args.reuse:
        manifest = synthetic.ensure_datasets(args.out, args.seed)  # says whether it kept the folder or wrote it
    else:
        sets = synthetic.generate_datasets(args.seed)
        manifest = synthetic.manifest_for(sets, args.seed)
        synthetic.save_datasets(sets, args.out, manifest, force=args.force)
    for name, counts in manifest["counts"].items():
        print(f"  {name:8s} " + "  ".join(f"{split} {count:4d}" for split, count in counts.items()))
    if not args.reuse:
        print(f"data written -> {args.out}")


def _cmd_data_import(args: argparse.Namespace) -> None:
    from safemerge.evaluators.imports import ImportRequest, import_datasets, parse_domains, report_lines

    request = ImportRequest(
        out=args.out,
        harmful=args.harmful,
        benign=args.benign,
        domains=parse_domains(args.domain),
        columns=args.columns,
        split=args.split,
        seed=args.seed,
        force=args.force,
    )
    manifest = import_datasets(request)
    for line in report_lines(manifest):
        print(line)
    print(f"data written -> {args.out}  (kept and dropped rows, with the first of each reason: manifest.json)")


def _split_fractions(text: str) -> tuple[float, float, float]:
    from safemerge.evaluators.imports import parse_split

    try:
        return parse_split(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


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

    from safemerge.evaluators import synthetic
    from safemerge.evaluators.generation import check_model_dir, open_backend
    from safemerge.evaluators.objectives import open_judge
    from safemerge.evaluators.pipeline import PipelineSettings, load_examples, run_pipeline
    from safemerge.files import check_output_dir

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

    from safemerge.evaluators.directions import OBJECTIVE_DIRECTIONS
    from safemerge.evaluators.objectives import evaluate_model_dir

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
    width = max(16, *map(len, metrics))  # a multiple-choice domain's domain_<name>_acc_norm is longer
    for name, value in metrics.items():
        print(f"  {name:{width}s} {value:10.4f}  {notes.get(OBJECTIVE_DIRECTIONS.get(name, ''), '')}")
    print(json.dumps(metrics))


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register `data generate`, `data import` and `eval` on the `safemerge` parser."""
    data = commands.add_parser("data", help="evaluation data sets: generate them, or import your own")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    generate = data_commands.add_parser(
        "generate",
        help="write the templated data sets (train/dev/test splits)",
        description="Write harmful, benign (XSTest-like), medical and finance sets with train/dev/test splits.",
    )
    generate.add_argument("--out", type=Path, required=True, help="folder to write the data sets into")
    add_seed(generate)
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

    imported = data_commands.add_parser(
        "import",
        help="import your own safety and domain sets (files, `datasets` folders, hf:ORG/NAME)",
        description="Read harmful, benign and domain sets from .jsonl, .json, .csv or .parquet files, folders "
        "saved with `datasets`, or hf:ORG/NAME[:CONFIG][@SPLIT]; drop empty, duplicate, over-long and malformed "
        "rows (counted in manifest.json with the first of each); write stratified train/dev/test splits. A domain "
        "set is open questions (prompt, answer[, reference]) or multiple choice (question, choices, answer as an "
        "index from 0 or a letter), told apart by its columns.",
    )
    imported.add_argument("--out", type=Path, required=True, help="folder to write the data sets into")
    imported.add_argument(
        "--harmful", required=True, metavar="SRC", help="harmful prompts (prompt[, reference, category])"
    )
    imported.add_argument(
        "--benign",
        metavar="SRC",
        help="benign look-alikes (prompt[, category]); without it the templated XSTest-like set is written",
    )
    imported.add_argument(
        "--domain",
        action="append",
        default=[],
        required=True,
        metavar="NAME=SRC",
        help="a domain set, scored as domain_NAME; a search reads the set named like its expert (repeatable)",
    )
    imported.add_argument(
        "--columns",
        action="append",
        default=[],
        metavar="SET:FIELD=COLUMN",
        help="read FIELD from another column, e.g. medqa:question=text; choices may be a comma list of "
        "columns, e.g. medmcqa:choices=opa,opb,opc,opd (repeatable)",
    )
    imported.add_argument(
        "--split",
        type=_split_fractions,
        default=(0.6, 0.2, 0.2),
        metavar="TRAIN,DEV,TEST",
        help="fractions of each set per split, stratified by category or relation (default: 0.6,0.2,0.2)",
    )
    add_seed(imported)
    imported.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    imported.set_defaults(handler=_cmd_data_import)

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
