"""The `safemerge merge`, `export` and `similarity` sub-commands: mergekit YAML in, a merged model folder, a mergekit
YAML or a similarity table out."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from safemerge.errors import UserError


def _model_path(text: str, role: str) -> Path:
    path = Path(text)
    if not path.is_dir():
        raise UserError(
            f"{role} {text!r} is not a local model folder; safemerge reads local folders only (download the model "
            "first and give its path)"
        )
    return path


def _cmd_merge(args: argparse.Namespace) -> None:
    from safemerge.files import check_output_dir
    from safemerge.merges.engine import MergeEngine
    from safemerge.merges.output import parse_size
    from safemerge.merges.passthrough import is_passthrough, merge_slices, parse_slices
    from safemerge.merges.recipe import parse_recipe

    if not args.config.is_file():
        raise UserError(f"CONFIG {args.config} does not exist; pass a mergekit YAML file")
    shard_size = parse_size(args.shard_size)
    check_output_dir(args.out_dir, args.force, option="OUT_DIR")
    data = _read_yaml(args.config, "CONFIG")
    if is_passthrough(data):
        stacked = parse_slices(data, source=str(args.config))
        merge_slices(stacked, args.out_dir, shard_size=shard_size, force=args.force)
        print(f"stacked {len(stacked.slices)} slice(s) (passthrough) -> {args.out_dir}")
        return
    recipe = parse_recipe(data, source=str(args.config))
    if args.seed is not None:
        recipe = recipe.model_copy(update={"seed": args.seed})
    reference = recipe.base_model or recipe.models[0].model
    _model_path(reference, "base_model" if recipe.base_model else "model")
    experts = {}
    for entry in recipe.models:
        if entry.model != reference:
            experts[entry.model] = _model_path(entry.model, "model")
    engine = MergeEngine(reference, experts, base_name=reference, device=args.device, recipe=recipe)
    engine.save(recipe, args.out_dir, shard_size=shard_size, force=args.force)
    print(f"merged {recipe.merge_method} of {len(recipe.models)} model(s) -> {args.out_dir}")


def _parse_paths(pairs: list[str]) -> dict[str, str]:
    paths = {}
    for pair in pairs:
        name, separator, path = pair.partition("=")
        if not separator or not name or not path:
            raise UserError(f"--path {pair!r} must look like NAME=FOLDER (for example medical=/models/medical)")
        paths[name] = path
    return paths


def _read_yaml(path: Path, what: str) -> object:
    try:
        return yaml.safe_load(path.read_text())  # JSON is YAML too
    except yaml.YAMLError as error:
        raise UserError(f"{what} {path} is not valid YAML or JSON ({error}); fix the file") from None


def _cmd_export(args: argparse.Namespace) -> None:
    from safemerge.merges.passthrough import is_passthrough, parse_slices, slices_yaml
    from safemerge.merges.recipe import parse_recipe, to_mergekit_yaml

    if not args.recipe.is_file():
        raise UserError(f"RECIPE {args.recipe} does not exist; pass a recipe file (YAML or JSON)")
    data = _read_yaml(args.recipe, "RECIPE")
    if is_passthrough(data):
        text = slices_yaml(parse_slices(data, source=str(args.recipe)))
    else:
        text = to_mergekit_yaml(parse_recipe(data, source=str(args.recipe)), _parse_paths(args.path))
    if args.out is None:
        sys.stdout.write(text)
        return
    if args.out.is_dir():
        raise UserError(f"--out {args.out} is a folder; pass a file name such as merge.yaml")
    if args.out.exists() and not args.force:
        raise UserError(f"--out {args.out} exists; pass --force to replace it, or pick another file")
    args.out.write_text(text)
    print(f"mergekit config -> {args.out}")


def _cmd_similarity(args: argparse.Namespace) -> None:
    from safemerge.merges.engine import MergeEngine
    from safemerge.merges.similarity import format_report, similarity_report

    if args.groups is not None and args.groups < 1:
        raise UserError(f"--groups must be at least 1, got {args.groups}")
    base = _model_path(args.base, "BASE")
    experts: dict[str, Path] = {}
    for text in args.models:
        path = _model_path(text, "MODEL")
        name = path.name or text
        while name in experts or name == "base":
            name += "'"
        experts[name] = path
    engine = MergeEngine(base, experts, base_name="base", device=args.device)
    report = similarity_report(engine, groups=args.groups)
    print(json.dumps(report, indent=2) if args.json else format_report(report))


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register `merge`, `export` and `similarity` on the `safemerge` parser."""
    merge = commands.add_parser(
        "merge",
        help="merge models from a mergekit YAML into a Hugging Face folder",
        description=(
            "Read a mergekit YAML (merge_method, base_model, models with parameters, top-level parameters, "
            "scalars, gradient lists, filter lists, dtype, tokenizer_source) and write the merged model as a "
            "Hugging Face folder: the same tensors mergekit-yaml writes, computed in memory."
        ),
    )
    merge.add_argument("config", type=Path, metavar="CONFIG.yaml", help="mergekit YAML file")
    merge.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="folder to write the merged model into")
    merge.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    merge.add_argument(
        "--shard-size", default="5GB", help="largest safetensors shard, such as 5GB or 500MB (default: 5GB)"
    )
    merge.add_argument(
        "--seed", type=int, default=None, help="seed for random methods (dare_*, della*); same seed, same merge"
    )
    merge.add_argument("--device", default=None, help="torch device for the math (default: cuda when available)")
    merge.set_defaults(handler=_cmd_merge)

    export = commands.add_parser(
        "export",
        help="turn a safemerge recipe into a mergekit YAML that mergekit-yaml reproduces",
        description=(
            "Read a recipe (YAML or JSON: merge_method, base_model, models, parameters, and for mergealign "
            "alignment_model) and print the mergekit YAML that makes the same tensors. Recipe model names are "
            "replaced by folders given with --path NAME=FOLDER."
        ),
    )
    export.add_argument("recipe", type=Path, metavar="RECIPE", help="recipe file (YAML or JSON)")
    export.add_argument(
        "--path", action="append", default=[], metavar="NAME=FOLDER", help="model folder for a recipe name (repeat)"
    )
    export.add_argument("--out", type=Path, default=None, help="write the YAML to this file instead of stdout")
    export.add_argument("--force", action="store_true", help="replace an existing --out file")
    export.set_defaults(handler=_cmd_export)

    similarity = commands.add_parser(
        "similarity",
        help="compare task vectors: cosine similarity, sign conflicts and norm ratios per layer group",
        description=(
            "Task vector = MODEL - BASE. Per layer group: cosine similarity and sign-conflict rate for each pair of "
            "models, and each task vector's norm relative to the base (the MergeAlign paper's analysis)."
        ),
    )
    similarity.add_argument("base", metavar="BASE", help="base model folder")
    similarity.add_argument("models", nargs="+", metavar="MODEL", help="model folders to compare (two or more)")
    similarity.add_argument("--groups", type=int, default=None, help="number of layer groups (default: one per layer)")
    similarity.add_argument("--json", action="store_true", help="print the report as JSON")
    similarity.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    similarity.set_defaults(handler=_cmd_similarity)
