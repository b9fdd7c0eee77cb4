"""Merge speed side by side: `mergekit-yaml` end to end against the path a trial worker runs, on a Llama-shaped
family of about 134M parameters (base + 2 experts, fp32, random weights), with the memory-bandwidth floor.

The worker's path: `engine.iter_merge(recipe)` yields each merged tensor as a new tensor, which is copied into the
"engine weights" (one preallocated tensor per merged tensor, standing in for vLLM's parameters, which
`reload_weights` copies into) and dropped. Each trial is timed from the recipe to the last weight copied. Target
(issue 13): at least 20x over mergekit-yaml for every method, printed as pass/fail.

Run: .venv/bin/python benchmarks/merge_speed.py [--work DIR] [--trials 5] [--threads N] [--methods ties slerp]
(default: every method of the method table that mergekit has under the same name).
Prints a table and, as its last line, a JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from safemerge.merges.methods import METHODS as METHOD_TABLE
from safemerge.zoo.random_family import LlamaShape, write_random_family

# Every method mergekit has under the same name (mergealign is its task_arithmetic with role weights).
METHODS = tuple(name for name, row in METHOD_TABLE.items() if row.mergekit_name == name)
SPEEDUP_TARGET = 20.0  # the worker's merge over mergekit-yaml end to end
# Llama shape: 12 layers, hidden 768, MLP 2048, vocabulary 32000, untied lm_head: 134.2M parameters.
SHAPE = LlamaShape(hidden=768, intermediate=2048, layers=12, heads=12, vocab=32000)


def build_family(work: Path) -> dict[str, Path]:
    return write_random_family(work, SHAPE, ("expert_a", "expert_b"))


# The values the benchmark merges with, where a method takes them: per model, then shared (a gradient for t).
PER_MODEL = {"weight": 0.6, "density": 0.5, "epsilon": 0.1, "gamma": 0.01}
SHARED = {"t": [0.2, 0.8], "select_topk": 0.5}
SHARED_BY_METHOD = {"nearswap": {"t": 0.001}}  # nearswap's t is a distance between weights, not a share


def recipe_for(method: str, folders: dict[str, Path]) -> dict:
    """A recipe of `method` from its row of the method table: one expert where it takes one, else two."""
    row = METHOD_TABLE[method]
    base, expert_a, expert_b = (str(folders[name]) for name in ("base", "expert_a", "expert_b"))
    per_model = {p.name: PER_MODEL[p.name] for p in row.params if p.per_model and p.name in PER_MODEL}
    shared = {**SHARED, **SHARED_BY_METHOD.get(method, {})}
    parameters = {p.name: shared[p.name] for p in row.params if not p.per_model and p.name in shared}
    experts = [expert_a] if row.max_models == 1 else [expert_a, expert_b]
    models = [{"model": model, **({"parameters": per_model} if per_model else {})} for model in experts]
    if row.max_models == 1:
        models.insert(0, {"model": base})  # as mergekit's examples list the pair
    recipe = {"merge_method": method, "models": models, "parameters": parameters, "dtype": "float32"}
    if row.base != "input":  # linear merges its inputs only: a base_model would be one more input to weight
        recipe["base_model"] = base
    return recipe


def run_mergekit(config: Path, out: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of one `mergekit-yaml` run."""
    command = [str(Path(sys.executable).parent / "mergekit-yaml"), str(config), str(out), "--no-cuda", "--quiet"]
    command += ["--no-copy-tokenizer", "--no-write-model-card", "--random-seed", "0"]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"mergekit-yaml failed on {config}: {process.stderr.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss / 1024**2


def copy_bandwidth() -> float:
    """Bytes per second that one copy moves (read + write), best of five on a 512 MB buffer."""
    source = torch.randn(128 * 1024**2)
    target = torch.empty_like(source)
    target.copy_(source)
    best = min(_timed(lambda: target.copy_(source)) for _ in range(5))
    return 2 * source.numel() * 4 / best


def _timed(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def stream_into(engine, recipe, weights: dict[str, torch.Tensor]) -> None:
    """The worker's merge: each tensor `iter_merge` yields is copied into the engine weights and dropped."""
    for name, tensor in engine.iter_merge(recipe):
        weights[name].copy_(tensor)


def worker(method: str, folders: dict[str, Path], trials: int) -> dict:
    """safemerge in a fresh process (so its peak RSS is this method's): load, then timed trials on the worker's
    path."""
    from safemerge.merges.engine import MergeEngine
    from safemerge.merges.recipe import parse_recipe

    data = recipe_for(method, folders)
    base = str(folders["base"])  # the engine's reference, whether or not the recipe names a base_model
    experts = {entry["model"]: entry["model"] for entry in data["models"] if entry["model"] != base}
    recipe = parse_recipe(data)
    start = time.perf_counter()
    engine = MergeEngine(base, experts, base_name=base, recipe=recipe)
    load = time.perf_counter() - start
    # The generation engine's weights, allocated once as vLLM's are; the first merge fills them (a warm-up).
    start = time.perf_counter()
    weights = {name: tensor.clone() for name, tensor in engine.iter_merge(recipe)}
    first = time.perf_counter() - start
    stream_into(engine, recipe, weights)  # a second warm-up: caches and allocator settle
    streamed = [_timed(lambda: stream_into(engine, recipe, weights)) for _ in range(trials)]
    return {
        "load_s": load,
        "first_merge_s": first,
        "trial_s": min(streamed),  # best of N: other work on shared cores only ever adds time
        "trial_median_s": statistics.median(streamed),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
        "device": str(engine.device),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="folder for the model family (default: a temp folder)")
    parser.add_argument("--trials", type=int, default=5, help="timed trials per method (the best is reported)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for both tools (default: torch's; 1 is steadier on busy cores)",
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, metavar="METHOD")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)  # for the subprocesses
    work = args.work or Path(tempfile.mkdtemp(prefix="merge-speed-"))
    folders = build_family(work)
    if args.worker:
        print(json.dumps(worker(args.worker, folders, args.trials)))
        return

    parameters = SHAPE.parameters()
    bandwidth = copy_bandwidth()
    results = {}
    for method in args.methods:
        config = work / f"{method}.yaml"
        config.write_text(yaml.safe_dump(recipe_for(method, folders)))
        mergekit_s, mergekit_rss = run_mergekit(config, work / f"{method}-mergekit")
        output = subprocess.run(
            [sys.executable, __file__, "--work", str(work), "--trials", str(args.trials), "--worker", method]
            + (["--threads", str(args.threads)] if args.threads else []),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        ours = json.loads(output.strip().splitlines()[-1])
        inputs = 2 if METHOD_TABLE[method].max_models == 1 else 3  # base + experts read once, output written once
        floor_s = (inputs + 1) * parameters * 4 / bandwidth
        speedup = mergekit_s / ours["trial_s"]
        results[method] = {
            "mergekit_s": round(mergekit_s, 3),
            "mergekit_peak_rss_gb": round(mergekit_rss, 2),
            "load_s": round(ours["load_s"], 3),
            "first_merge_s": round(ours["first_merge_s"], 4),
            "trial_s": round(ours["trial_s"], 4),
            "trial_median_s": round(ours["trial_median_s"], 4),
            "floor_s": round(floor_s, 4),
            "speedup_vs_mergekit": round(speedup, 1),
            "speedup_pass": speedup >= SPEEDUP_TARGET,
            "x_of_floor": round(ours["trial_s"] / floor_s, 2),
            "peak_rss_gb": round(ours["peak_rss_gb"], 2),
        }

    print(
        f"{parameters / 1e6:.1f}M parameters per model, fp32; copy bandwidth {bandwidth / 1e9:.1f} GB/s; "
        f"device {ours['device']}; torch threads {torch.get_num_threads()}; load average {os.getloadavg()[0]:.1f}"
    )
    header = ("method", "mergekit s", "load s", "trial s", "median s", "floor s", "speedup", ">=20x", "x floor")
    header += ("RSS GB", "mergekit GB")
    print("  ".join(f"{cell:>16s}" for cell in header))
    for method, row in results.items():
        cells = (
            method,
            row["mergekit_s"],
            row["load_s"],
            row["trial_s"],
            row["trial_median_s"],
            row["floor_s"],
            row["speedup_vs_mergekit"],
            "pass" if row["speedup_pass"] else "FAIL",
            row["x_of_floor"],
            row["peak_rss_gb"],
            row["mergekit_peak_rss_gb"],
        )
        print("  ".join(f"{cell:>16}" for cell in cells))
    print(
        "trial = the worker's merge (iter_merge, each new tensor copied into preallocated engine weights), best of "
        f"{args.trials}; speedup = mergekit-yaml end to end / trial (target >= {SPEEDUP_TARGET:g}x); floor = "
        "reading the inputs once and writing the weights once at the copy bandwidth; load = building the engine "
        "(one-time)"
    )
    print(json.dumps({"parameters": parameters, "copy_bandwidth_gbps": round(bandwidth / 1e9, 2), "methods": results}))


if __name__ == "__main__":
    main()
