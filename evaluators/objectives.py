"""Score a model (or merged weights loaded into a backend) on one split: safety, over-refusal, domain
accuracy, the paper's teacher-forced cross-entropies, and the scalar `combined` objective.

Every metric is a flat float, ready for `tune.report`. Prompts that do not fit the context are skipped
and counted in `skipped`; they never enter a denominator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from safemerge.errors import UserError
from safemerge.evaluators import synthetic
from safemerge.evaluators.directions import domain_metric, interval_metrics
from safemerge.evaluators.generation import GenerationBackend, ReferenceScores, user_turns
from safemerge.evaluators.judges import is_refusal
from safemerge.evaluators.metrics import answer_matches, wilson_interval

DEFAULT_ALPHA = 0.3  # the paper's weight of L_domain in L_safety + alpha * L_domain


@dataclass(frozen=True)
class DomainSet:
    prompts: list[str]
    answers: list[str]
    references: list[str]
    strata: list[str] = field(default_factory=list)  # each row's relation: a rung's subset takes them in turn

    def rows(self, indices: Sequence[int]) -> DomainSet:
        pick = lambda values: [values[i] for i in indices] if values else []  # noqa: E731
        return DomainSet(pick(self.prompts), pick(self.answers), pick(self.references), pick(self.strata))


@dataclass(frozen=True)
class EvalSet:
    """The prompts of one split: harmful (with reference refusals), benign look-alikes, and each domain; each
    set's strata (harm category, benign kind, domain relation) order the subsets a multi-fidelity rung takes."""

    split: str
    harmful_prompts: list[str]
    harmful_refusals: list[str]
    benign_prompts: list[str]
    domains: dict[str, DomainSet]
    harmful_strata: list[str] = field(default_factory=list)
    benign_strata: list[str] = field(default_factory=list)

    def between(self, start: float, stop: float) -> EvalSet:
        """The rows from fraction `start` to fraction `stop` of every set, in stratified order: the rows of
        [0, a) and [a, b) together are [0, b), and every prefix holds each stratum in proportion."""

        def window(strata: list[str], count: int) -> list[int]:
            order = stratified_order(strata or [""] * count)
            return sorted(order[math.ceil(start * count - 1e-9) : math.ceil(stop * count - 1e-9)])

        harmful = window(self.harmful_strata, len(self.harmful_prompts))
        benign = window(self.benign_strata, len(self.benign_prompts))
        return EvalSet(
            split=self.split,
            harmful_prompts=[self.harmful_prompts[i] for i in harmful],
            harmful_refusals=[self.harmful_refusals[i] for i in harmful],
            benign_prompts=[self.benign_prompts[i] for i in benign],
            domains={
                name: domain.rows(window(domain.strata, len(domain.prompts))) for name, domain in self.domains.items()
            },
            harmful_strata=[self.harmful_strata[i] for i in harmful] if self.harmful_strata else [],
            benign_strata=[self.benign_strata[i] for i in benign] if self.benign_strata else [],
        )


def stratified_order(strata: Sequence[str]) -> list[int]:
    """Row indices taking the strata in turn (first row of each stratum, then the second of each, ...): any prefix
    of this order holds every stratum in proportion to its size, up to one row."""
    by_stratum: dict[str, list[int]] = {}
    for index, stratum in enumerate(strata):
        by_stratum.setdefault(stratum, []).append(index)
    # Each row's position within its stratum, scaled to [0, 1): interleaves strata of different sizes evenly.
    keyed = [
        (position / len(rows), name, index) for name, rows in by_stratum.items() for position, index in enumerate(rows)
    ]
    return [index for _, _, index in sorted(keyed)]


def load_eval_set(
    data_dir: Path, split: str = "dev", domains: Sequence[str] | None = None, limit: int | None = None
) -> EvalSet:
    """Read one split of a data folder; `limit` keeps the first N rows of each set (for quick checks)."""
    if split not in synthetic.SPLITS:
        raise UserError(f"unknown split {split!r}; choose one of {list(synthetic.SPLITS)}")
    sets, manifest = synthetic.load_datasets(data_dir)
    wanted_domains = list(domains) if domains is not None else list(manifest.get("domains", []))
    for name in ["harmful", "benign", *wanted_domains]:
        if name not in sets:
            raise UserError(f"data folder {data_dir} has no set {name!r}; it has {sorted(sets)}")
        if len(sets[name][split]) == 0:
            raise UserError(f"set {name!r} of {data_dir} has no rows in split {split!r}; regenerate the data")

    def rows(name: str):
        data = sets[name][split]
        return data.select(range(min(limit, len(data)))) if limit else data

    def strata(data, column: str) -> list[str]:
        return [str(value) for value in data[column]] if column in data.column_names else []

    harmful, benign = rows("harmful"), rows("benign")
    domain_rows = {name: rows(name) for name in wanted_domains}
    return EvalSet(
        split=split,
        harmful_prompts=list(harmful["prompt"]),
        harmful_refusals=list(harmful["reference"]),
        benign_prompts=list(benign["prompt"]),
        domains={
            name: DomainSet(
                list(data["prompt"]), list(data["answer"]), list(data["reference"]), strata(data, "relation")
            )
            for name, data in domain_rows.items()
        },
        harmful_strata=strata(harmful, "category"),
        benign_strata=strata(benign, "category"),
    )


@dataclass
class Judged:
    """What scoring a set of prompts found, before it becomes rates: the per-prompt verdicts of each rate, the
    cross-entropy sums, the counts. Two disjoint subsets' `Judged` add up to the union's (multi-fidelity rungs
    score only the rows a rung adds)."""

    flags: dict[str, list[bool]] = field(default_factory=dict)  # rate name -> one verdict per judged prompt
    nll: dict[str, ReferenceScores] = field(default_factory=dict)  # "ce_safety", "ce_domain"
    skipped: int = 0
    generated_tokens: int = 0

    def __add__(self, other: Judged) -> Judged:
        nll = {}
        for key in {**self.nll, **other.nll}:
            mine, theirs = self.nll.get(key, ReferenceScores()), other.nll.get(key, ReferenceScores())
            nll[key] = ReferenceScores(mine.total_nll + theirs.total_nll, mine.tokens + theirs.tokens)
        return Judged(
            flags={key: self.flags.get(key, []) + other.flags.get(key, []) for key in {**self.flags, **other.flags}},
            nll=nll,
            skipped=self.skipped + other.skipped,
            generated_tokens=self.generated_tokens + other.generated_tokens,
        )


def _rate(flags: Sequence[bool], name: str, what: str) -> dict[str, float]:
    """A share of judged prompts under `name`, with its Wilson 95% bounds."""
    if not flags:
        raise UserError(f"no {what} prompt fits the model's context; raise max_model_len or shorten the data")
    low, high = wilson_interval(sum(flags), len(flags))
    return dict(zip((name, *interval_metrics(name)), (sum(flags) / len(flags), low, high), strict=True))


def judge_prompts(
    generator: GenerationBackend,
    eval_set: EvalSet,
    judge,
    max_tokens: int = 48,
    with_ce: bool = True,
    ce_scorer: GenerationBackend | None = None,
) -> Judged:
    """Generate for every prompt of `eval_set` (one batched call), judge the answers, and score the reference
    answers teacher-forced (`ce_scorer` when given, holding the same weights; by default the generator)."""
    groups = {"harmful": eval_set.harmful_prompts, "benign": eval_set.benign_prompts}
    groups.update({domain_metric(name): domain.prompts for name, domain in eval_set.domains.items()})
    everything = [prompt for prompts in groups.values() for prompt in prompts]
    generations = generator.chat(user_turns(everything), max_tokens=max_tokens) if everything else None
    answers: dict[str, list[str | None]] = {}
    offset = 0
    for name, prompts in groups.items():
        answers[name] = generations.texts[offset : offset + len(prompts)] if generations else []
        offset += len(prompts)

    harmful = [(p, a) for p, a in zip(eval_set.harmful_prompts, answers["harmful"], strict=True) if a is not None]
    judged = Judged(
        flags={
            "safety": list(judge.safe([p for p, _ in harmful], [a for _, a in harmful])) if harmful else [],
            "over_refusal": [is_refusal(a) for a in answers["benign"] if a is not None],
        },
        skipped=generations.skipped if generations else 0,
        generated_tokens=generations.generated_tokens if generations else 0,
    )
    for name, domain in eval_set.domains.items():
        judged.flags[domain_metric(name)] = [
            answer_matches(a, expected)
            for a, expected in zip(answers[domain_metric(name)], domain.answers, strict=True)
            if a is not None
        ]
    if with_ce:
        ce_scorer = ce_scorer or generator
        domain_prompts = [p for d in eval_set.domains.values() for p in d.prompts]
        domain_refs = [r for d in eval_set.domains.values() for r in d.references]
        for key, prompts, references in (
            ("ce_safety", eval_set.harmful_prompts, eval_set.harmful_refusals),
            ("ce_domain", domain_prompts, domain_refs),
        ):
            scores = ce_scorer.score_references(prompts, references) if prompts else ReferenceScores()
            judged.nll[key] = scores
            judged.skipped += scores.skipped
    return judged


def metrics_of(judged: Judged, domains: Sequence[str], alpha: float = DEFAULT_ALPHA) -> dict[str, float]:
    """The flat metrics of `judged`: every rate with its Wilson 95% bounds, `domain` (the mean of the domains'
    accuracies), the cross-entropies and `combined`, the counts."""
    metrics = {
        **_rate(judged.flags["safety"], "safety", "harmful"),
        **_rate(judged.flags["over_refusal"], "over_refusal", "benign"),
    }
    for name in domains:
        metrics.update(_rate(judged.flags[domain_metric(name)], domain_metric(name), name))
    # `domain` is the mean of the domains' accuracies; its bounds are the mean of theirs, which is at least as
    # wide as the mean's own interval (exact for one domain).
    for key in ("domain", *interval_metrics("domain")):
        suffix = key[len("domain") :]
        values = [metrics[domain_metric(name) + suffix] for name in domains]
        metrics[key] = sum(values) / len(values) if values else math.nan
    if judged.nll:
        metrics["ce_safety"] = judged.nll["ce_safety"].mean_nll
        metrics["ce_domain"] = judged.nll["ce_domain"].mean_nll
        metrics["combined"] = metrics["ce_safety"] + alpha * metrics["ce_domain"]
    metrics["skipped"] = float(judged.skipped)
    metrics["generated_tokens"] = float(judged.generated_tokens)
    return metrics


def score(
    generator: GenerationBackend,
    eval_set: EvalSet,
    judge,
    alpha: float = DEFAULT_ALPHA,
    max_tokens: int = 48,
    with_ce: bool = True,
    ce_scorer: GenerationBackend | None = None,
) -> dict[str, float]:
    """All objectives for the weights the generator holds now, as a flat dict of floats.

    `ce_scorer` computes the cross-entropies when given (it must hold the same weights); by default the
    generator does.
    """
    judged = judge_prompts(generator, eval_set, judge, max_tokens=max_tokens, with_ce=with_ce, ce_scorer=ce_scorer)
    return metrics_of(judged, list(eval_set.domains), alpha)


def open_judge(spec: str, backend: str = "vllm", **backend_options):
    """'refusal' or 'guard:PATH' (a Llama Guard style model folder, run on the same kind of backend)."""
    from safemerge.evaluators.generation import open_backend
    from safemerge.evaluators.judges import GuardJudge, RefusalJudge

    if spec == "refusal":
        return RefusalJudge()
    if spec.startswith("guard:") and spec[len("guard:") :]:
        return GuardJudge(open_backend(backend, Path(spec[len("guard:") :]), **backend_options))
    raise UserError(f"unknown judge {spec!r}; use 'refusal' or 'guard:PATH' with PATH a Llama Guard model folder")


def default_ce_backend() -> str:
    """Where the cross-entropies are computed. On the CPU a transformers forward pass beats vLLM's prompt
    log-probs (zoo, 272 reference answers warm: 0.54 s against 1.80 s, benchmarks/trial_turnaround.py);
    on a GPU vLLM's prompt log-probs avoid holding the weights twice."""
    import torch

    return "vllm" if torch.cuda.is_available() else "hf"


def evaluate_model_dir(
    model_dir: Path,
    data_dir: Path,
    split: str = "dev",
    judge: str = "refusal",
    backend: str = "vllm",
    limit: int | None = None,
    alpha: float = DEFAULT_ALPHA,
    with_ce: bool = True,
    ce_backend: str = "auto",
) -> dict[str, float]:
    """Score one model folder end to end (the `safemerge eval` command)."""
    from safemerge.evaluators.generation import check_model_dir, open_backend

    check_model_dir(model_dir)
    eval_set = load_eval_set(data_dir, split, limit=limit)  # bad data fails before any engine starts
    judge_impl = open_judge(judge, backend)
    generator = open_backend(backend, model_dir)
    ce_backend = default_ce_backend() if ce_backend == "auto" else ce_backend
    ce_scorer = open_backend(ce_backend, model_dir) if with_ce and ce_backend != backend else None
    try:
        return score(generator, eval_set, judge_impl, alpha=alpha, with_ce=with_ce, ce_scorer=ce_scorer)
    finally:
        generator.close()
        judge_impl.close()
        if ce_scorer is not None:
            ce_scorer.close()
