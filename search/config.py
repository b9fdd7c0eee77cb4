"""The search config: a YAML file validated with pydantic before anything starts (errors name the field and
the fix). `configs/zoo.yaml` is the default; `configs/llama3-medical.yaml` shows a real cluster."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from safemerge.errors import UserError
from safemerge.evaluators.directions import OBJECTIVE_DIRECTIONS
from safemerge.evaluators.lm_eval_tasks import SOURCE_PREFIX as LM_EVAL_SOURCE
from safemerge.evaluators.lm_eval_tasks import task_of
from safemerge.search.samplers import SAMPLER_NAMES

# The roles of a search's input models, as recipes name them; each expert's role is its domain name.
BASE_ROLE = "base"
ALIGNED_ROLE = "aligned"
# Where a domain's accuracy comes from (`domain:`): its set in the data folder, or an lm-eval-harness task.
DATA_SOURCE = "data"
CONSTRAINT = re.compile(r"^\s*(<=|>=)\s*([-+]?\d*\.?\d+)\s*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # a NaN or Inf in a config is refused at parse


class ModelsConfig(_Strict):
    """Model references: `zoo:NAME` (the embedded zoo), a local folder, or a Hugging Face model id."""

    base: str
    aligned: str
    experts: dict[str, str] = Field(min_length=1, description="domain name -> expert model")
    guard: str | None = None

    @field_validator("experts")
    @classmethod
    def _domains_are_names(cls, experts: dict[str, str]) -> dict[str, str]:
        for domain in experts:
            if not re.fullmatch(r"[a-z][a-z0-9_]*", domain):
                raise ValueError(f"domain {domain!r} must be a lower-case name like 'medical'")
            if domain in (BASE_ROLE, ALIGNED_ROLE):
                raise ValueError(f"domain {domain!r} is the name of a model role; call the domain by its field")
        return experts

    def roles(self) -> dict[str, str]:
        """Role -> model reference: base, aligned and one role per expert, named after its domain."""
        return {BASE_ROLE: self.base, ALIGNED_ROLE: self.aligned, **self.experts}

    def merged_roles(self) -> list[str]:
        """The roles a recipe merges onto the base: the aligned model, then the experts."""
        return [ALIGNED_ROLE, *self.experts]


class ObjectivesConfig(_Strict):
    maximize: list[str] = Field(default_factory=lambda: ["safety", "domain"])
    minimize: list[str] = Field(default_factory=list)
    constraints: dict[str, str] = Field(default_factory=lambda: {"over_refusal": "<= 0.1"})

    @model_validator(mode="after")
    def _known_objectives(self) -> ObjectivesConfig:
        names = [*self.maximize, *self.minimize]
        if not names:
            raise ValueError("name at least one objective under maximize or minimize")
        for name in [*names, *self.constraints]:
            if name not in OBJECTIVE_DIRECTIONS:
                raise ValueError(f"unknown objective {name!r}; use one of {sorted(OBJECTIVE_DIRECTIONS)}")
        if len(set(names)) != len(names):
            raise ValueError("an objective is listed twice")
        for name, rule in self.constraints.items():
            if not CONSTRAINT.match(rule):
                raise ValueError(f"constraint {name}: {rule!r} must look like '<= 0.1' or '>= 0.5'")
        return self

    def directions(self) -> list[str]:
        """Optuna directions in objective order."""
        return ["maximize"] * len(self.maximize) + ["minimize"] * len(self.minimize)

    def names(self) -> list[str]:
        return [*self.maximize, *self.minimize]

    def violations(self, metrics: dict[str, float]) -> list[float]:
        """Optuna's constraint convention: one value per constraint, <= 0 when satisfied."""
        values = []
        for name, rule in self.constraints.items():
            operator, bound = CONSTRAINT.match(rule).groups()
            values.append(metrics[name] - float(bound) if operator == "<=" else float(bound) - metrics[name])
        return values


class WorkersConfig(_Strict):
    count: int | Literal["auto"] = Field(
        1, description="worker actors; 'auto': as many as the cluster's GPUs (CPUs without GPUs) allow"
    )

    @field_validator("count")
    @classmethod
    def _positive(cls, count: int | str) -> int | str:
        if count != "auto" and count < 1:
            raise ValueError("count must be at least 1, or 'auto' for one worker per GPU of the cluster")
        return count

    cpus: float = Field(1.0, gt=0)
    gpus: float = Field(0.0, ge=0)
    # 32 concurrent sequences: decoding an 8B model on one GPU reads every weight once per step whatever the batch,
    # so throughput grows almost linearly up to there; and 32 full-length sequences of Llama-3-8B at 4096 tokens
    # are a 16 GiB KV cache, which leaves room for the Llama Guard judge on one 80 GiB GPU (README, "Memory").
    max_num_seqs: int = Field(
        32,
        ge=1,
        description="sequences each vLLM engine runs at once on a GPU; its KV cache holds that many at "
        "evaluation.max_model_len (the judge runs at most 16)",
    )
    gpu_memory_gib: float | None = Field(
        None, gt=0, description="memory of one worker's GPU; unset: the memory plan reads the GPU where it runs"
    )
    host_memory_gib: float | None = Field(
        None, gt=0, description="memory of one worker's machine; unset: the plan reads the machine it runs on"
    )


class MlflowConfig(_Strict):
    tracking_uri: str = "sqlite:///artifacts/mlflow.db"
    experiment: str = "safemerge"
    registry_prefix: str = Field("safemerge", description="registered model names start with this")

    @field_validator("tracking_uri")
    @classmethod
    def _no_credentials(cls, uri: str) -> str:
        """Server credentials move to MLflow's environment variables (see search/secrets.py)."""
        from safemerge.search.secrets import without_mlflow_credentials, without_storage_password

        if "://" in uri and not uri.startswith(("http://", "https://")) and without_storage_password(uri) != uri:
            raise ValueError(
                "a database URL with a password would be written into the search's files; use an MLflow server "
                "(http://HOST:5000, credentials in MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD) or leave the "
                "password out of the URL (PostgreSQL reads PGPASSWORD)"
            )
        return without_mlflow_credentials(uri)


class EvaluationConfig(_Strict):
    judge: str = "refusal"
    limit: int | None = Field(None, ge=1, description="only the first N prompts of each set (quick runs)")
    max_tokens: int = Field(48, ge=1)
    max_model_len: int = Field(512, ge=16)
    alpha: float = Field(0.3, ge=0, description="combined = ce_safety + alpha * ce_domain")
    safety_data: bool = Field(True, description="false: the paper's ablation, objectives see domain data only")
    trial_timeout_s: float | None = Field(
        3600.0,
        gt=0,
        description="a trial's evaluation that takes longer is hung: its worker is restarted and the trial re-run "
        "(null: no limit)",
    )
    fault_retries: int = Field(
        3, ge=0, description="re-runs of a trial whose worker died or hung; they do not spend the budget"
    )
    lm_eval_include_path: Path | None = Field(
        None, description="a folder of your own lm-eval task YAML files, for `domain: {NAME: lm_eval:TASK}`"
    )
    rungs: list[float] = Field(
        default_factory=lambda: [1.0],
        description="multi-fidelity: the shares of the dev split a trial is scored on in turn (e.g. [0.125, 0.5, 1]; "
        "each rung scores only the rows it adds); a trial whose optimistic bounds a feasible full-split trial "
        "dominates stops at its rung, recorded as pruned. [1.0]: every trial on the whole split",
    )

    @field_validator("rungs")
    @classmethod
    def _rungs_grow_to_the_whole_split(cls, rungs: list[float]) -> list[float]:
        growing = all(a < b for a, b in zip(rungs, rungs[1:], strict=False))
        if not rungs or rungs[-1] != 1.0 or rungs[0] <= 0 or not growing:
            raise ValueError(
                f"rungs must grow from above 0 to exactly 1.0 (the whole dev split), e.g. [0.25, 1.0]; got {rungs}"
            )
        return rungs


class BudgetConfig(_Strict):
    """Limits on what a search spends beyond its trial count (search/budget.py); the first one reached ends it.
    No trial starts once a limit is reached; the trials running then finish, so a search may overrun it by
    those."""

    generated_tokens: int | None = Field(
        None, ge=1, description="tokens the trials generate on the dev split, every rung included (null: no limit)"
    )
    minutes: float | None = Field(
        None, gt=0, description="wall-clock minutes of the search, its earlier drivers' included (null: no limit)"
    )


class SearchConfig(_Strict):
    model_config = ConfigDict(**_Strict.model_config, validate_by_name=True, serialize_by_alias=True)
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    models: ModelsConfig
    zoo_dir: Path = Path("artifacts/zoo")
    data: Path = Path("artifacts/data")
    methods: list[str] = Field(default_factory=lambda: ["task_arithmetic", "ties", "dare_ties", "mergealign"])
    layer_groups: int = Field(2, ge=1)
    module_filters: bool = Field(True, description="separate coefficients for self_attn, mlp and other tensors")
    objectives: ObjectivesConfig = Field(default_factory=ObjectivesConfig)
    sampler: Literal[SAMPLER_NAMES] = SAMPLER_NAMES[0]  # type: ignore[valid-type]
    trials: int = Field(24, ge=1, description="the most trials the search runs; `budget` may end it sooner")
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    warm_start: bool = Field(
        True, description="the first trials are each method's standard uniform recipe (not with the grid sampler)"
    )
    workers: WorkersConfig = Field(default_factory=WorkersConfig)
    max_failures: int = Field(1, ge=0, description="retries of a failed trial before it is recorded as failed")
    lease_timeout_s: float = Field(
        120.0,
        gt=0,
        description="a driver's lease on its search goes stale this long after its last heartbeat (it died); "
        "only then may another driver resume the search",
    )
    storage: str = "sqlite:///artifacts/optuna.db"
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    domain: dict[str, str] = Field(
        default_factory=dict,
        description="where an expert domain's accuracy comes from: 'data' (its set in the data folder, the default) "
        "or 'lm_eval:TASK', an lm-eval-harness task scored through the worker's engine (extra safemerge[lm-eval]); "
        "e.g. {medical: lm_eval:medqa_4options}",
    )
    results_dir: Path = Path("artifacts/searches")
    # `register:` in a config; named otherwise here, as `register` is a method every pydantic model has.
    registration: Literal["picks", "all", "recipes"] = Field(
        "picks",
        alias="register",
        description="what finalize registers for each front entry: a recipe-only version (its mergekit YAML, input "
        "models and metrics: kilobytes) or the merged weights too. picks: weights only for the entries with an "
        "alias (best-safety, best-domain, balanced, and those chosen with `safemerge pick`); all: weights for every "
        "entry; recipes: weights for none (`safemerge pick` adds them for the one chosen)",
    )
    seed: int = 0

    @field_validator("storage")
    @classmethod
    def _storage_without_password(cls, url: str) -> str:
        """The password stays in this process (search/secrets.py); the config holds the URL without it."""
        from safemerge.search.secrets import without_storage_password

        return without_storage_password(url)

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, methods: list[str]) -> list[str]:
        if not methods:
            raise ValueError("list at least one merge method")
        # The method table says which methods a search may choose; imported here, as it loads torch (seconds),
        # which a config that only validates does not need otherwise.
        from safemerge.merges.methods import searchable_methods
        from safemerge.merges.passthrough import PASSTHROUGH, UNSEARCHABLE

        searchable = searchable_methods()
        for method in methods:
            if method == PASSTHROUGH:
                raise ValueError(UNSEARCHABLE)
            if method not in searchable:
                raise ValueError(f"unknown or unsearchable method {method!r}; use some of {list(searchable)}")
        return methods

    @model_validator(mode="after")
    def _consistent(self) -> SearchConfig:
        from safemerge.merges.methods import METHODS

        # (a method with a model limit is searched as the aligned model and one expert)
        pairs = [method for method in self.methods if METHODS[method].max_models is not None]
        if pairs and len(self.models.experts) != 1:
            raise ValueError(
                f"{', '.join(pairs)}: merges the aligned model with one expert; with several experts, drop "
                f"{', '.join(pairs)} from methods"
            )
        if self.sampler == "cmaes" and self.objectives.names() != ["combined"]:
            raise ValueError("sampler cmaes optimizes one scalar: set objectives to minimize: [combined]")
        if self.sampler != "cmaes" and "combined" in self.objectives.names() and len(self.objectives.names()) > 1:
            raise ValueError("combined is already a scalar of ce_safety and ce_domain; do not mix it with others")
        if self.evaluation.judge != "refusal" and not self.evaluation.judge.startswith("guard"):
            raise ValueError("evaluation.judge must be 'refusal' or 'guard' (the models.guard folder)")
        if self.evaluation.judge.startswith("guard") and self.models.guard is None:
            raise ValueError("evaluation.judge 'guard' needs models.guard")
        for name, source in self.domain.items():
            if name not in self.models.experts:
                raise ValueError(
                    f"domain {name!r} is not an expert's domain; name one of {list(self.models.experts)} under domain"
                )
            if source != DATA_SOURCE and not source.startswith(LM_EVAL_SOURCE):
                raise ValueError(f"domain {name}: {source!r} must be 'data' or '{LM_EVAL_SOURCE}TASK'")
            if source.startswith(LM_EVAL_SOURCE) and not task_of(source):
                raise ValueError(f"domain {name}: {source!r} names no task; write {LM_EVAL_SOURCE}TASK")
        return self

    def anchored(self, home: Path) -> SearchConfig:
        """This config with every relative path made absolute against `home` (see `search.anchoring`)."""
        from safemerge.search.anchoring import anchored

        return anchored(self, home)

    def lm_eval_tasks(self) -> dict[str, str]:
        """Domain name -> lm-eval task name, for the domains scored by an lm-eval task."""
        return {name: task_of(source) for name, source in self.domain.items() if task_of(source)}

    def resolve_model(self, reference: str) -> Path:
        """`zoo:NAME` -> the zoo folder; an existing folder -> itself; else a Hugging Face id, downloaded."""
        from safemerge.search.model_sources import resolve_model

        return resolve_model(reference, self.zoo_dir)


def load_config(path: Path, overrides: dict | None = None) -> SearchConfig:
    """Read and validate a search config; `overrides` (dotted keys) apply on top, e.g. {'trials': 8}."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config {path} does not exist; start from configs/zoo.yaml")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise UserError(f"config {path} is not valid YAML: {error}".splitlines()[0]) from None
    return parse_config(data, str(path), overrides)


def parse_config(data: dict, source: str, overrides: dict | None = None) -> SearchConfig:
    """Validate config data (a parsed YAML mapping) with dotted `overrides`; errors name `source` and the field."""
    if not isinstance(data, dict):
        raise UserError(f"config {source} must be a mapping of fields, like configs/zoo.yaml")
    for dotted, value in (overrides or {}).items():
        target = data
        *parents, leaf = dotted.split(".")
        for depth, key in enumerate(parents):
            if target.get(key) is None:  # absent, or an empty YAML section
                target[key] = {}
            target = target[key]
            if not isinstance(target, dict):
                parent = ".".join(parents[: depth + 1])
                raise UserError(f"override {dotted}: {parent} in config {source} is not a section of fields")
        target[leaf] = value
    try:
        return SearchConfig.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "(top level)"
        message = first["msg"].removeprefix("Value error, ")
        raise UserError(f"config {source}: {where}: {message}") from None
