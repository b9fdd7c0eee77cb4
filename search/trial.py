"""The trial worker: a Ray actor that holds, across trials, a merge engine (base weights and task vectors
computed once) and a running vLLM engine, so a trial is merge in memory -> swap in place -> score.

One worker per GPU on a cluster; one or two on a CPU machine. A bad recipe fails its trial with a clear
error and the worker takes the next one.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import ray

from safemerge.errors import UserError
from safemerge.evaluators.directions import reported_metrics
from safemerge.evaluators.generation import VLLMGenerator, fatal_engine_error, open_backend
from safemerge.evaluators.lm_eval_tasks import LmEvalDomain
from safemerge.evaluators.objectives import (
    Judged,
    default_ce_backend,
    judge_prompts,
    load_eval_set,
    metrics_of,
    open_judge,
)
from safemerge.evaluators.synthetic import multiple_choice_domains
from safemerge.merges.engine import MergeEngine
from safemerge.merges.recipe import Recipe, parse_recipe, to_mergekit_yaml
from safemerge.search.config import BASE_ROLE, SearchConfig
from safemerge.search.plan import check_plan, plan_worker
from safemerge.search.progress import worker_env
from safemerge.search.trainable import recipe_key

# What a worker adds to the evaluator's metrics of a trial: which worker, how long, and the share of the split
# scored (below 1 for a multi-fidelity trial stopped at an early rung).
WORKER_METRICS = ("worker", "duration_s", "fidelity")
# What the trainable adds: how often the trial was re-run after its worker died or hung (search/trainable.py).
FAULT_METRICS = ("worker_faults",)


def trial_metric_names(config: SearchConfig) -> list[str]:
    """Every metric a trial of this search reports: the evaluator's (per-domain figures included, and the `acc` and
    `acc_norm` of the data folder's multiple-choice domains and of lm-eval domains, where their task has them) and
    the worker's."""
    experts = list(config.models.experts)
    multiple_choice = [name for name in multiple_choice_domains(config.data) if name in experts]
    multiple_choice += [name for name in config.lm_eval_tasks() if name not in multiple_choice]
    return [*reported_metrics(experts, multiple_choice), *WORKER_METRICS, *FAULT_METRICS]


def single_model_recipe(role: str) -> dict:
    """The recipe that scores one input model as it is (a baseline: the aligned model, an expert)."""
    return {"merge_method": "linear", "models": [{"model": role, "parameters": {"weight": 1.0}}]}


@dataclass(frozen=True)
class ScoredShare:
    """What scoring a recipe on a share of a split found so far: (recipe key, split), the share, the verdicts."""

    key: tuple[str, str]
    share: float
    judged: Judged


class WorkerUnusable(RuntimeError):
    """The worker's engines are in no known state; only a fresh process can serve again."""


def end_actor_process(error: BaseException) -> None:
    """Inside a Ray actor, end the process after a fatal error: Ray restarts the actor with fresh engines and
    the trainable re-runs the trial (search/trainable.py). Outside one (a test, the driver) the error is raised."""
    if ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None:
        print(f"worker: fatal error, ending this process for Ray to restart it: {error!r}", file=sys.stderr, flush=True)
        os._exit(70)


class TrialWorker:
    """Plain class (tests and the driver's one-off evaluations use it directly); `RemoteTrialWorker` is the actor."""

    def __init__(self, config: dict, worker_index: int = 0) -> None:
        started = time.perf_counter()
        self.config = SearchConfig.model_validate(config)
        self.worker_index = worker_index
        models = self.config.models
        self.folders = {role: self.config.resolve_model(reference) for role, reference in models.roles().items()}
        base = self.folders[BASE_ROLE]
        evaluation = self.config.evaluation
        # On a GPU the memory plan, made before any weight is read, refuses a worker that does not fit, places
        # the merge store (on the device, or pinned host memory streamed to it) and sizes each vLLM engine; the
        # CPU build runs float32 and sizes its KV cache from VLLM_CPU_KVCACHE_SPACE.
        memory_plan = plan_worker(self.config) if self.config.workers.gpus > 0 else None
        if memory_plan is not None:
            check_plan(memory_plan)
        self.merge_engine = MergeEngine(
            base,
            {role: path for role, path in self.folders.items() if role != BASE_ROLE},
            base_name=BASE_ROLE,
            store_device="cpu" if memory_plan is not None and not memory_plan.store_on_device else None,
        )
        if memory_plan is not None:
            self.generator = VLLMGenerator(base, seed=self.config.seed, **memory_plan.generator_options())
        else:
            self.generator = VLLMGenerator(base, max_model_len=evaluation.max_model_len, seed=self.config.seed)
        ce_backend = default_ce_backend()
        self.ce_scorer = open_backend(ce_backend, base) if ce_backend != "vllm" else None
        judge = evaluation.judge
        if judge.startswith("guard"):
            judge = f"guard:{self.config.resolve_model(models.guard)}"
        self.judge = open_judge(judge, **(memory_plan.judge_options() if memory_plan is not None else {}))
        self.eval_sets = {}
        # lm-eval domains: each task is loaded once per worker, its documents scored through the engines.
        self.lm_eval_domains = {
            name: LmEvalDomain(task, evaluation.lm_eval_include_path, seed=self.config.seed)
            for name, task in self.config.lm_eval_tasks().items()
        }
        self._loaded = parse_recipe(single_model_recipe(BASE_ROLE), source="base recipe")  # what the engines hold
        # The last evaluation's scored share: a direct caller's next rung of the same recipe adds to it.
        self._partial: ScoredShare | None = None
        self.evaluation_times: list[tuple[float, float]] = []  # (start, end) of each evaluation, epoch seconds
        self.setup_seconds = time.perf_counter() - started

    def num_layers(self) -> int:
        return self.merge_engine.num_layers

    def _eval_set(self, split: str):
        if split not in self.eval_sets:
            self.eval_sets[split] = load_eval_set(
                self.config.data,
                split,
                domains=list(self.config.models.experts),
                limit=self.config.evaluation.limit,
                tasks=self.lm_eval_domains,
            )
        return self.eval_sets[split]

    def load(self, recipe: dict) -> None:
        """Merge `recipe` in memory and stream it into the engines, one tensor at a time (never a second copy of
        the model). A tensor that fails its check midway (NaN, Inf) leaves the engines part-way, so the last good
        recipe is streamed back in before the error goes on: the trial fails, the engines keep their weights."""
        parsed = parse_recipe(recipe, source="trial recipe")
        if parsed == self._loaded:  # a multi-fidelity trial's next rung, or its test split: the engines hold it
            return
        self.merge_engine.plan(parsed)  # a bad recipe fails here, before any engine is touched
        try:
            self._stream(parsed)
        except Exception:
            try:
                self._stream(self._loaded)
            except Exception as error:  # the engines hold neither merge: this worker cannot go on
                message = f"the engines' weights could not be restored after a failed swap: {error}"
                raise WorkerUnusable(message) from error
            raise
        self._loaded = parsed

    def _stream(self, recipe: Recipe) -> None:
        tensors = self.merge_engine.iter_merge(recipe)
        if self.ce_scorer is not None:
            tensors = self.ce_scorer.copy_through(tensors)
        self.generator.load_weights(tensors)

    def evaluate(self, recipe: dict, split: str = "dev", fidelity: float = 1.0) -> dict[str, float]:
        """Every objective of one recipe on the first `fidelity` of one split (stratified), plus this worker's
        index and the evaluation's duration. When this worker scored the same recipe on a smaller share last (a
        caller asking for rungs in turn), only the rows the rung adds are generated and judged."""
        return self.evaluate_rung(recipe, split, fidelity, self._partial)[0]

    def evaluate_rung(
        self, recipe: dict, split: str, fidelity: float, scored: ScoredShare | None = None
    ) -> tuple[dict[str, float], ScoredShare]:
        """`evaluate`, continuing from `scored` (what an earlier rung of this recipe scored, on any worker; None:
        nothing yet): the rows up to its share are not generated again. A search's trial carries its scored share
        from rung to rung, as the next rung runs on whichever worker is free, after other trials' evaluations.
        Returns the metrics and the share scored now."""
        started, started_at = time.perf_counter(), time.time()
        key = (recipe_key(recipe), split)
        if scored is None or scored.key != key or scored.share >= fidelity:
            scored = ScoredShare(key, 0.0, Judged())
        try:
            self.load(recipe)
            evaluation = self.config.evaluation
            judged = scored.judged + judge_prompts(
                self.generator,
                self._eval_set(split).between(scored.share, fidelity),
                self.judge,
                max_tokens=evaluation.max_tokens,
                ce_scorer=self.ce_scorer,
            )
            metrics = metrics_of(judged, list(self.config.models.experts), evaluation.alpha)
            self._partial = ScoredShare(key, fidelity, judged)
        except Exception as error:
            self._partial = None
            if isinstance(error, WorkerUnusable) or fatal_engine_error(error):
                end_actor_process(error)
            raise
        finally:
            elapsed = time.perf_counter() - started
            self.evaluation_times.append((started_at, started_at + elapsed))
        worker = dict(zip(WORKER_METRICS, (float(self.worker_index), elapsed, fidelity), strict=True))
        return {**metrics, **worker}, self._partial

    def reference_losses(self, split: str = "dev") -> dict[str, float]:
        """Each input model's mean reference cross-entropy on the split (LM-Cocktail's weights come from it)."""
        losses = {}
        eval_set = self._eval_set(split)
        prompts = eval_set.harmful_prompts + [p for d in eval_set.domains.values() for p in d.prompts]
        references = eval_set.harmful_refusals + [r for d in eval_set.domains.values() for r in d.references]
        scorer = self.ce_scorer or self.generator
        for role in self.config.models.merged_roles():
            self.load(single_model_recipe(role))
            losses[role] = scorer.score_references(prompts, references).mean_nll
        return losses

    def save(self, recipe: dict, out_dir: str) -> str:
        """Materialize a recipe as a Hugging Face folder (atomically)."""
        return str(self.merge_engine.save(parse_recipe(recipe, source="recipe"), Path(out_dir), force=True))

    def similarity(self, groups: int | None = None) -> tuple[str, dict[str, float]]:
        """The task-vector similarity table (text) and its flat metrics, for MLflow."""
        from safemerge.merges.similarity import format_report, similarity_metrics, similarity_report

        return format_report(similarity_report(self.merge_engine, groups)), similarity_metrics(
            self.merge_engine, groups
        )

    def mergekit_yaml(self, recipe: dict) -> str:
        """The recipe as mergekit YAML over the model folders (a method that reads the weights is resolved by the
        engine: selective_layers' layers)."""
        paths = self.model_paths()
        return to_mergekit_yaml(parse_recipe(recipe, source="recipe"), paths, self.merge_engine.layer_cosines)

    def model_paths(self) -> dict[str, str]:
        return {name: str(path) for name, path in self.folders.items()}

    def stats(self) -> dict:
        """Busy seconds, evaluations and set-up seconds, and when each evaluation ran (for busy-share timelines)."""
        return {
            "busy_seconds": sum(end - start for start, end in self.evaluation_times),
            "trials": float(len(self.evaluation_times)),
            "setup_seconds": self.setup_seconds,
            "evaluation_times": list(self.evaluation_times),
        }

    def close(self) -> None:
        for closable in (self.generator, self.ce_scorer, self.judge):
            if closable is not None:
                closable.close()


RemoteTrialWorker = ray.remote(TrialWorker)


def worker_count(config: SearchConfig) -> int:
    """The configured count, or for 'auto' as many workers as the connected cluster has GPUs (CPUs when the
    workers ask for no GPU) for, each taking the resources the config names."""
    workers = config.workers
    if workers.count != "auto":
        return workers.count
    resources = ray.cluster_resources()
    if workers.gpus > 0:
        count = int(resources.get("GPU", 0) // workers.gpus)
    else:
        count = int(resources.get("CPU", 0) // workers.cpus)
    if count < 1:
        raise UserError(
            f"workers.count 'auto': the cluster has {resources.get('GPU', 0):g} GPUs and {resources.get('CPU', 0):g} "
            f"CPUs, too few for one worker of {workers.gpus:g} GPUs and {workers.cpus:g} CPUs"
        )
    return count


def start_workers(config: SearchConfig) -> list:
    """One actor per worker, each with the CPUs and GPUs the config names."""
    workers = config.workers
    # Restarted by Ray whenever its process dies (the trainable re-runs the interrupted trial); a call in flight
    # is not retried by Ray, as only the trainable knows whether the fault was the worker's or the recipe's.
    # vLLM's info lines off in the workers unless --verbose (search/progress.py); a cluster's workers do not
    # inherit the driver's environment, so it travels in the actors' runtime environment.
    quiet = worker_env()
    actor = RemoteTrialWorker.options(
        num_cpus=workers.cpus,
        num_gpus=workers.gpus,
        max_concurrency=1,
        max_restarts=-1,
        max_task_retries=0,
        runtime_env={"env_vars": quiet} if quiet else None,
    )
    handles = [actor.remote(config.model_dump(mode="json"), index) for index in range(worker_count(config))]
    ray.get([handle.num_layers.remote() for handle in handles])  # wait until every engine is up
    return handles
