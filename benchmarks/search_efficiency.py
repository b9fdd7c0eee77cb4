"""Compare the samplers on the zoo at one budget over several seeds: hypervolume of (safety, domain) at the
end, trials needed to reach random search's final hypervolume, and the workers' busy share.

`--tokens N` gives every search the same budget in evaluation cost (`budget.generated_tokens`, with `--trials` as
a cap): the comparison the default sampler is chosen by. The default (the first of search/samplers.py) should have
the best mean hypervolume over the seeds, or be within one standard error of it, and beat random's.

Every sampler runs the same search (configs/zoo.yaml) on the same pool of worker actors; cmaes optimizes the
scalar `combined` (the paper's EvoMM baseline) and is scored on the same (safety, domain) front as the others.
Targets: the default sampler (the first of search/samplers.py, tpe) reaches at least random's and grid's
hypervolume, in at most half the trials random needs to reach it (per seed); workers busy at least 90% of the
search time with 2 workers.

With `--rungs 0.25 1` every search also runs multi-fidelity (search/fidelity.py), and each row reports the tokens
its trials generated, pruned ones included: the cost at which it reached its hypervolume.

Run: .venv/bin/python benchmarks/search_efficiency.py [--trials 24] [--tokens N] [--seeds 0 1 2] [--workers 2]
     [--rungs 0.25 1] [--limit 0]
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
from safemerge.search.pareto import hypervolume, hypervolume_history
from safemerge.search.progress import quiet_libraries
from safemerge.search.samplers import SAMPLER_NAMES

DEFAULT_SAMPLER = SAMPLER_NAMES[0]


def trials_to_reach(history: list[float], target: float) -> int | None:
    """1-based number of trials after which the hypervolume first reaches `target` (None: never)."""
    for index, value in enumerate(history):
        if value >= target - 1e-12:
            return index + 1
    return None


def cost_curve(study: optuna.Study, objectives: ObjectivesConfig) -> list[tuple[float, float]]:
    """(tokens generated so far, hypervolume of the completed trials so far) after each finished trial, in trial
    order: pruned trials add their tokens and no point."""
    finished = sorted(
        (t for t in study.trials if t.state.is_finished()), key=lambda t: t.datetime_complete or t.datetime_start
    )
    points = {p.number: p for p in study_points(study)}
    curve, spent, seen = [], 0.0, []
    for trial in finished:
        spent += trial.user_attrs.get("metrics", {}).get("generated_tokens", 0.0)
        if trial.number in points:
            seen.append(points[trial.number])
        curve.append((spent, hypervolume(seen, objectives)))
    return curve


def tokens_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """Tokens spent when the hypervolume first reaches `target` (None: never)."""
    return next((tokens for tokens, volume in curve if volume >= target - 1e-12), None)


def standard_error(values: list[float]) -> float:
    return statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0


def sampler_config(
    base: SearchConfig,
    sampler: str,
    seed: int,
    scratch: Path,
    rungs: list[float] | None = None,
    tokens: int | None = None,
) -> SearchConfig:
    data = base.model_dump(mode="json")
    suffix = "-mf" if rungs else ""
    data.update(
        name=f"bench-{sampler}{suffix}-s{seed}", sampler=sampler, seed=seed, storage=f"sqlite:///{scratch}/optuna.db"
    )
    data["evaluation"]["rungs"] = rungs or [1.0]
    data["budget"]["generated_tokens"] = tokens
    data["results_dir"] = str(scratch / "searches")
    if sampler == "cmaes":
        data["objectives"] = {"maximize": [], "minimize": ["combined"], "constraints": {}}
    return SearchConfig.model_validate(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/zoo.yaml"))
    parser.add_argument("--trials", type=int, default=24, help="budget of every search (default: 24)")
    parser.add_argument(
        "--tokens", type=int, help="every search's budget in generated tokens (equal cost; --trials caps it)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--limit", type=int, default=20, help="prompts per set and trial (default: 20; 0: all)")
    parser.add_argument(
        "--rungs", type=float, nargs="+", help="also run each search multi-fidelity on these shares, e.g. 0.25 1"
    )
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLER_NAMES), choices=SAMPLER_NAMES)
    args = parser.parse_args()
    quiet_libraries()  # the benchmark's own lines only, as a search prints them

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
                config = sampler_config(base, sampler, seed, Path(scratch), rungs, args.tokens)
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
                    "trials": len(study.trials),
                    "cost_curve": cost_curve(study, front_objectives),
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
                    f"{len(study.trials)} trials, {tokens:.0f} tokens, {pruned} pruned, busy {row['busy_share']:.0%} "
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
            "hypervolume_se": standard_error([r["hypervolume"] for r in rows]),
            "trials_mean": statistics.mean(r["trials"] for r in rows),
            "hypervolume_per_seed": [round(r["hypervolume"], 4) for r in rows],
            "trials_to_random_final_hv": reach,
            "generated_tokens_mean": statistics.mean(r["generated_tokens"] for r in rows),
            "pruned_mean": statistics.mean(r["pruned"] for r in rows),
            "busy_share_mean": statistics.mean(r["busy_share"] for r in rows),
            "busy_share_steady_mean": statistics.mean(r["busy_share_steady"] for r in rows),
            "tune_start_and_stop_s_mean": statistics.mean(r["tune_start_and_stop_s"] for r in rows),
        }
    print(
        f"\n{'sampler':10} {'HV mean':>8} {'SE':>7} {'HV per seed':>24} {'trials':>6} {'tokens':>9} "
        f"{'trials to random HV':>20} {'busy':>6} {'steady':>7} {'Tune start+stop':>16}"
    )
    for sampler, row in summary.items():
        print(
            f"{sampler:10} {row['hypervolume_mean']:8.4f} {row['hypervolume_se']:7.4f} "
            f"{str(row['hypervolume_per_seed']):>24} {row['trials_mean']:6.1f} {row['generated_tokens_mean']:9.0f} "
            f"{str(row['trials_to_random_final_hv']):>22} {row['busy_share_mean']:6.0%} "
            f"{row['busy_share_steady_mean']:7.0%} {row['tune_start_and_stop_s_mean']:14.1f} s"
        )
    default, random_ = summary.get(DEFAULT_SAMPLER), summary.get("random")
    verdict: dict = {"default_sampler": DEFAULT_SAMPLER}
    if summary:
        best = max(summary, key=lambda name: summary[name]["hypervolume_mean"])
        verdict["best_mean_hv"] = best
    if default and summary:
        # At equal cost, the default must be the best mean or within one standard error of it, and beat random.
        verdict["default_within_one_se_of_best"] = (
            default["hypervolume_mean"] + default["hypervolume_se"] >= summary[best]["hypervolume_mean"]
        )
    if default and random_:
        needed = [n for n in default["trials_to_random_final_hv"] if n is not None]
        # per seed: the default's trials to random's final hypervolume against the trials random itself needed
        random_needed = random_["trials_to_random_final_hv"]
        verdict.update(
            {
                "default_hv_above_random": default["hypervolume_mean"] > random_["hypervolume_mean"],
                "default_hv_ge_grid": "grid" not in summary
                or default["hypervolume_mean"] >= summary["grid"]["hypervolume_mean"],
                "default_trials_to_random_hv_mean": statistics.mean(needed) if needed else None,
                "random_trials_to_its_final_hv_mean": statistics.mean(random_needed),
            }
        )
    # Multi-fidelity against the same sampler on the whole split, per seed: the tokens the multi-fidelity search
    # had spent when it first came within 0.01 of the full search's final hypervolume, as a share of all the full
    # search's tokens (None: it never did).
    for sampler in args.samplers if args.rungs else []:
        full_rows, multi_rows = results[sampler], results[f"{sampler}+mf"]
        shares = []
        for full_row, multi_row in zip(full_rows, multi_rows, strict=True):
            reached = tokens_to_reach(multi_row["cost_curve"], full_row["hypervolume"] - 0.01)
            shares.append(None if reached is None else round(reached / full_row["generated_tokens"], 3))
        full, multi = summary[sampler], summary[f"{sampler}+mf"]
        verdict[f"{sampler}_mf_hv_gap"] = round(full["hypervolume_mean"] - multi["hypervolume_mean"], 4)
        verdict[f"{sampler}_mf_token_share_to_reach_full_hv_per_seed"] = shares
        verdict[f"{sampler}_mf_within_0.01_at_a_quarter_of_the_tokens"] = all(
            share is not None and share <= 0.25 for share in shares
        )
    busy = min(row["busy_share_mean"] for row in summary.values())
    busy_steady = min(row["busy_share_steady_mean"] for row in summary.values())
    print(
        json.dumps(
            {
                "trials": args.trials,
                "tokens": args.tokens,
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
