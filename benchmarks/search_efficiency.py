"""Compare the samplers on the zoo at one budget over several seeds: hypervolume of (safety, domain) at the
end, trials needed to reach random search's final hypervolume, and the workers' busy share.

Every sampler runs the same search (configs/zoo.yaml) on the same pool of worker actors; cmaes optimizes the
scalar `combined` (the paper's EvoMM baseline) and is scored on the same (safety, domain) front as the others.
Targets: the default sampler (nsga2) reaches at least random's and grid's hypervolume, in at most half the
trials random needs to reach it (per seed); workers busy at least 90% of the search time with 2 workers.

With `--rungs 0.25 1` every search also runs multi-fidelity (search/fidelity.py), and each row reports the tokens
its trials generated, pruned ones included: the cost at which it reached its hypervolume.

Run: .venv/bin/python benchmarks/search_efficiency.py [--trials 24] [--seeds 0 1 2] [--workers 2] [--rungs 0.25 1]
Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import optuna
import ray

from safemerge.search.config import ObjectivesConfig, SearchConfig, load_config
from safemerge.search.driver import run_search, study_points, worker_pool
from safemerge.search.pareto import hypervolume_history
from safemerge.search.samplers import SAMPLER_NAMES


def trials_to_reach(history: list[float], target: float) -> int | None:
    """1-based number of trials after which the hypervolume first reaches `target` (None: never)."""
    for index, value in enumerate(history):
        if value >= target - 1e-12:
            return index + 1
    return None


def sampler_config(
    base: SearchConfig, sampler: str, seed: int, scratch: Path, rungs: list[float] | None = None
) -> SearchConfig:
    data = base.model_dump(mode="json")
    suffix = "-mf" if rungs else ""
    data.update(
        name=f"bench-{sampler}{suffix}-s{seed}", sampler=sampler, seed=seed, storage=f"sqlite:///{scratch}/optuna.db"
    )
    data["evaluation"]["rungs"] = rungs or [1.0]
    data["results_dir"] = str(scratch / "searches")
    if sampler == "cmaes":
        data["objectives"] = {"maximize": [], "minimize": ["combined"], "constraints": {}}
    return SearchConfig.model_validate(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/zoo.yaml"))
    parser.add_argument("--trials", type=int, default=24, help="budget of every search (default: 24)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--limit", type=int, default=20, help="prompts per set and trial (default: 20; 0: all)")
    parser.add_argument(
        "--rungs", type=float, nargs="+", help="also run each search multi-fidelity on these shares, e.g. 0.25 1"
    )
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLER_NAMES), choices=SAMPLER_NAMES)
    args = parser.parse_args()

    front_objectives = ObjectivesConfig()  # (safety, domain), over_refusal <= 0.1: every sampler is scored on it
    base = load_config(
        args.config, {"trials": args.trials, "workers.count": args.workers, "evaluation.limit": args.limit or None}
    )
    variants = [(sampler, None) for sampler in args.samplers]
    variants += [(sampler, args.rungs) for sampler in args.samplers] if args.rungs else []
    label = lambda sampler, rungs: f"{sampler}+mf" if rungs else sampler  # noqa: E731
    results: dict[str, list[dict]] = {label(*variant): [] for variant in variants}
    with tempfile.TemporaryDirectory(prefix="search-efficiency-") as scratch, worker_pool(base) as workers:
        for seed in args.seeds:
            for sampler, rungs in variants:
                config = sampler_config(base, sampler, seed, Path(scratch), rungs)
                started_at, started = time.time(), time.perf_counter()
                study = run_search(config, workers, log=lambda _: None)
                wall = time.perf_counter() - started
                evaluations = [
                    (start, end)
                    for stats in ray.get([w.stats.remote() for w in workers])
                    for start, end in stats["evaluation_times"]
                    if start >= started_at
                ]
                busy = sum(end - start for start, end in evaluations)
                # From the first evaluation's start to the last one's end: the share Tune's start and shutdown
                # (a fixed few seconds per search, whatever its budget) leave out.
                window = max(end for _, end in evaluations) - min(start for start, _ in evaluations)
                history = hypervolume_history(study_points(study), front_objectives)
                tokens = sum(t.user_attrs.get("metrics", {}).get("generated_tokens", 0.0) for t in study.trials)
                pruned = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.PRUNED,)))
                row = {
                    "generated_tokens": tokens,
                    "pruned": pruned,
                    "seed": seed,
                    "hypervolume": history[-1] if history else 0.0,
                    "history": history,
                    "busy_share": busy / (wall * len(workers)),
                    "busy_share_steady": busy / (window * len(workers)),
                    "tune_start_and_stop_s": wall - window,
                    "seconds": wall,
                }
                results[label(sampler, rungs)].append(row)
                print(
                    f"{label(sampler, rungs):10s} seed {seed}: hypervolume {row['hypervolume']:.4f}, "
                    f"{tokens:.0f} tokens, {pruned} pruned, busy {row['busy_share']:.0%} "
                    f"(between first and last evaluation {row['busy_share_steady']:.0%}), {wall:.0f} s",
                    flush=True,
                )

    summary = {}
    for sampler, rows in results.items():
        reach = []
        for row in rows:
            random_row = next((r for r in results.get("random", []) if r["seed"] == row["seed"]), None)
            reach.append(trials_to_reach(row["history"], random_row["hypervolume"]) if random_row else None)
        summary[sampler] = {
            "hypervolume_mean": statistics.mean(r["hypervolume"] for r in rows),
            "hypervolume_per_seed": [round(r["hypervolume"], 4) for r in rows],
            "trials_to_random_final_hv": reach,
            "generated_tokens_mean": statistics.mean(r["generated_tokens"] for r in rows),
            "pruned_mean": statistics.mean(r["pruned"] for r in rows),
            "busy_share_mean": statistics.mean(r["busy_share"] for r in rows),
            "busy_share_steady_mean": statistics.mean(r["busy_share_steady"] for r in rows),
            "tune_start_and_stop_s_mean": statistics.mean(r["tune_start_and_stop_s"] for r in rows),
        }
    print(
        f"\n{'sampler':8} {'HV mean':>8} {'HV per seed':>24} {'trials to random HV':>22} {'busy':>6} "
        f"{'steady':>7} {'Tune start+stop':>16}"
    )
    for sampler, row in summary.items():
        print(
            f"{sampler:8} {row['hypervolume_mean']:8.4f} {str(row['hypervolume_per_seed']):>24} "
            f"{str(row['trials_to_random_final_hv']):>22} {row['busy_share_mean']:6.0%} "
            f"{row['busy_share_steady_mean']:7.0%} {row['tune_start_and_stop_s_mean']:14.1f} s"
        )
    default, random_ = summary.get("nsga2"), summary.get("random")
    verdict = {}
    if default and random_:
        needed = [n for n in default["trials_to_random_final_hv"] if n is not None]
        # per seed: nsga2's trials to random's final hypervolume against the trials random itself needed
        random_needed = random_["trials_to_random_final_hv"]
        verdict = {
            "nsga2_hv_ge_random": default["hypervolume_mean"] >= random_["hypervolume_mean"],
            "nsga2_hv_ge_grid": "grid" not in summary
            or default["hypervolume_mean"] >= summary["grid"]["hypervolume_mean"],
            "nsga2_trials_to_random_hv_mean": statistics.mean(needed) if needed else None,
            "random_trials_to_its_final_hv_mean": statistics.mean(random_needed),
            "nsga2_reaches_random_hv_in_half_the_trials": all(
                mine is not None and mine <= theirs / 2
                for mine, theirs in zip(default["trials_to_random_final_hv"], random_needed, strict=True)
            ),
        }
    # Multi-fidelity against the same sampler on the whole split: hypervolume reached and the share of its tokens.
    for sampler in args.samplers if args.rungs else []:
        full, multi = summary[sampler], summary[f"{sampler}+mf"]
        verdict[f"{sampler}_mf_hv_gap"] = round(full["hypervolume_mean"] - multi["hypervolume_mean"], 4)
        verdict[f"{sampler}_mf_token_share"] = round(multi["generated_tokens_mean"] / full["generated_tokens_mean"], 3)
        verdict[f"{sampler}_mf_within_0.01_at_a_quarter_of_the_tokens"] = (
            verdict[f"{sampler}_mf_hv_gap"] <= 0.01 and verdict[f"{sampler}_mf_token_share"] <= 0.25
        )
    busy = min(row["busy_share_mean"] for row in summary.values())
    busy_steady = min(row["busy_share_steady_mean"] for row in summary.values())
    print(
        json.dumps(
            {
                "trials": args.trials,
                "seeds": args.seeds,
                "workers": args.workers,
                "samplers": {k: {key: v for key, v in row.items()} for k, row in summary.items()},
                **verdict,
                "min_busy_share": round(busy, 3),
                "busy_share_target_met": busy >= 0.9,
                "min_busy_share_steady": round(busy_steady, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
