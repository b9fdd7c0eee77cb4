"""Time one search trial on the zoo: merge in memory, swap into a running vLLM engine, generate and score the
dev sets; against the on-disk baseline (write the merged folder, start a fresh engine, generate, score).
Also vLLM against transformers generation on the same prompts (tokens per second).

Run: .venv/bin/python benchmarks/trial_turnaround.py [--config configs/zoo.yaml]
Last line: JSON with swap_speedup and vllm_vs_hf.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from safemerge.evaluators.generation import HFGenerator, user_turns
from safemerge.evaluators.objectives import evaluate_model_dir, load_eval_set
from safemerge.merges.recipe import parse_recipe
from safemerge.search.config import load_config
from safemerge.search.trial import TrialWorker


def recipe_for(rng: random.Random) -> dict:
    weights = {"aligned": round(rng.uniform(0.3, 1.0), 3), "medical": round(rng.uniform(0.3, 1.0), 3)}
    return {
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "models": [{"model": name, "parameters": {"weight": weight}} for name, weight in weights.items()],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/zoo.yaml"))
    parser.add_argument("--in-place-trials", type=int, default=6)
    parser.add_argument("--on-disk-trials", type=int, default=3)
    args = parser.parse_args()
    rng = random.Random(0)
    config = load_config(args.config)

    # The in-place path is what a search worker does: TrialWorker holds the engines across trials.
    # Both paths time the same recipes: a merge that babbles generates every token it may, so recipes differ.
    recipes = [recipe_for(rng) for _ in range(max(args.in_place_trials, args.on_disk_trials))]
    started = time.perf_counter()
    worker = TrialWorker(config.model_dump(mode="json"))
    for recipe in recipes:  # a first pass compiles vLLM's kernels for the batch shapes these merges produce
        worker.evaluate(recipe)
    setup_seconds = time.perf_counter() - started

    in_place = []
    for recipe in recipes[: args.in_place_trials]:
        t0 = time.perf_counter()
        worker.evaluate(recipe)
        in_place.append(time.perf_counter() - t0)
    merge_seconds, swap_seconds = [], []
    for _ in range(3):  # the parts of a trial, timed apart
        t0 = time.perf_counter()
        tensors = worker.merge_engine.merge(parse_recipe(recipe_for(rng)))
        t1 = time.perf_counter()
        worker.generator.load_weights(tensors)
        swap_seconds.append(time.perf_counter() - t1)
        merge_seconds.append(t1 - t0)

    # The on-disk baseline: write the merged folder, then fresh engines score it (as `safemerge eval` does).
    on_disk = []
    scratch = Path(tempfile.mkdtemp(prefix="trial-turnaround-"))
    try:
        for index, recipe in enumerate(recipes[: args.on_disk_trials]):
            t0 = time.perf_counter()
            folder = worker.save(recipe, str(scratch / f"merge-{index}"))
            evaluate_model_dir(Path(folder), config.data, split="dev", judge=config.evaluation.judge)
            on_disk.append(time.perf_counter() - t0)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    # Generation throughput on the same prompts and weights (the zoo's medical expert), greedy.
    eval_set = load_eval_set(config.data, "dev", domains=list(config.models.experts))
    prompts = user_turns(
        eval_set.harmful_prompts + eval_set.benign_prompts + [p for d in eval_set.domains.values() for p in d.prompts]
    )
    worker.load({"merge_method": "linear", "models": [{"model": "medical", "parameters": {"weight": 1.0}}]})
    worker.generator.chat(prompts[:8])
    t0 = time.perf_counter()
    vllm_tokens = worker.generator.chat(prompts, max_tokens=48).generated_tokens
    vllm_tps = vllm_tokens / (time.perf_counter() - t0)
    worker.close()
    hf = HFGenerator(config.resolve_model(config.models.experts["medical"]))
    t0 = time.perf_counter()
    hf_tokens = hf.chat(prompts, max_tokens=48).generated_tokens
    hf_tps = hf_tokens / (time.perf_counter() - t0)

    in_place_mean, on_disk_mean = statistics.mean(in_place), statistics.mean(on_disk)
    same_recipes = statistics.mean(in_place[: len(on_disk)])  # the speedup compares like with like
    print(f"one-time setup (merge engine, vLLM engine, CE scorer, warm-up pass): {setup_seconds:.2f} s")
    print(f"{'path':30s} {'trials':>6s} {'mean s':>8s} {'min s':>8s} {'max s':>8s}")
    print(
        f"{'in place (merge, swap, score)':30s} {len(in_place):6d} {in_place_mean:8.2f} {min(in_place):8.2f} "
        f"{max(in_place):8.2f}"
    )
    print(f"{'  merge in memory':30s} {len(merge_seconds):6d} {statistics.mean(merge_seconds):8.3f}")
    print(f"{'  swap into vLLM':30s} {len(swap_seconds):6d} {statistics.mean(swap_seconds):8.3f}")
    print(
        f"{'on disk (write, start, score)':30s} {len(on_disk):6d} {on_disk_mean:8.2f} {min(on_disk):8.2f} "
        f"{max(on_disk):8.2f}"
    )
    print(f"generation on {len(prompts)} prompts: vLLM {vllm_tps:8.1f} tok/s, transformers {hf_tps:8.1f} tok/s")
    print(
        json.dumps(
            {
                "swap_speedup": round(on_disk_mean / same_recipes, 2),
                "vllm_vs_hf": round(vllm_tps / hf_tps, 2),
                "in_place_trial_s": round(in_place_mean, 3),
                "on_disk_trial_s": round(on_disk_mean, 3),
                "merge_s": round(statistics.mean(merge_seconds), 4),
                "swap_s": round(statistics.mean(swap_seconds), 4),
                "setup_s": round(setup_seconds, 2),
                "vllm_tokens_per_s": round(vllm_tps, 1),
                "hf_tokens_per_s": round(hf_tps, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
