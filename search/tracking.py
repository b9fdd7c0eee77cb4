"""MLflow tracking of a search: one parent run (its description the front as a table), one child run per finished
trial, Pareto tags, artifacts, and the registry versions of the front: recipe-only (the mergekit YAML, the input
models, the metrics: kilobytes) or with the merged weights in MLflow's `transformers` flavour (the aliased picks),
with the aliases best-safety, best-domain and balanced.

The Optuna study is the record and MLflow a mirror of it: every call here is idempotent (run again, it adds
nothing that is there), and MLflow not answering is one line on the console, never an error of the search. What
did not reach MLflow is mirrored at the next sync (after the next trial, at finalize, or `safemerge search sync`)."""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import mlflow
import optuna
import requests
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from safemerge.evaluators.directions import RATE_OBJECTIVES, bound, domain_metric, interval_metrics
from safemerge.search.config import SearchConfig
from safemerge.search.pareto import Point

SEARCH_TAG = "safemerge.search"
ROLE_TAG = "safemerge.role"
TRIAL_TAG = "safemerge.trial"
# Set last on a child run: a run without it was cut off mid-logging and is logged again.
COMPLETE_TAG = "safemerge.complete"
# What MLflow not answering raises: the REST client's errors, the HTTP layer's, the socket's.
OUTAGE_ERRORS = (MlflowException, requests.exceptions.RequestException, OSError)
# The REST client retries a refused connection 7 times with a doubling backoff (about 4 minutes) by default; the
# mirror retries at the next sync instead, so a call gives up after seconds. A user's own setting wins.
FAST_FAILING_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
PARAMS_PER_BATCH = 100  # MLflow's limit per log_batch call
# A registry version's tag: whether it holds the merged weights (else only the recipe, kilobytes).
WEIGHTS_TAG = "safemerge.weights"
DESCRIPTION_TAG = "mlflow.note.content"  # what the MLflow UI shows as a run's description
RECIPE_FOLDER = "recipe"  # a child run's artifact folder that a recipe-only version points at
MODEL_NAME = "merged_model"  # the logged transformers model of a version with weights

Result = TypeVar("Result")


def _flat_params(trial: optuna.trial.FrozenTrial) -> dict[str, str]:
    return {name: str(value) for name, value in trial.params.items()}


class Tracker:
    """The MLflow mirror of one search. `available` says whether the last call reached MLflow."""

    def __init__(self, config: SearchConfig, log: Callable[[str], None] = print) -> None:
        self.config, self.log = config, log
        for name, value in FAST_FAILING_HTTP.items():
            os.environ.setdefault(name, value)
        # Both URIs pinned to the config: an inherited MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI must not win.
        mlflow.set_tracking_uri(config.mlflow.tracking_uri)
        mlflow.set_registry_uri(config.mlflow.tracking_uri)
        self.client = MlflowClient(tracking_uri=config.mlflow.tracking_uri, registry_uri=config.mlflow.tracking_uri)
        self.experiment_id: str | None = None
        self.parent_id: str | None = None
        self.available = True
        self._start_background()
        self._mirrored("open the search's parent run", lambda: None)

    def _start_background(self) -> None:
        self._sync_lock = threading.Lock()
        self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-sync")
        self._queued: Future | None = None

    # Tune pickles its callbacks (and so this tracker) into the experiment state: the thread parts stay behind.
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_sync_lock", "_background", "_queued", "log")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.log = print
        self._start_background()

    def _mirrored(self, doing: str, action: Callable[[], Result]) -> Result | None:
        """Run `action` once the parent run exists; None (and one line when MLflow just went away) if MLflow
        does not answer."""
        try:
            self._connect()
            result = action()
        except OUTAGE_ERRORS as error:
            if self.available:
                reason = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
                self.log(
                    f"MLflow at {self.config.mlflow.tracking_uri} did not answer ({reason}) while trying to {doing}; "
                    f"the Optuna study keeps every trial, and they reach MLflow at the next sync, or with "
                    f"`safemerge search sync {self.config.name}`"
                )
            self.available = False
            return None
        if not self.available:
            self.log(f"MLflow at {self.config.mlflow.tracking_uri} answers again")
        self.available = True
        return result

    def _connect(self) -> None:
        if self.experiment_id is None:
            experiment = self.client.get_experiment_by_name(self.config.mlflow.experiment)
            self.experiment_id = (
                experiment.experiment_id
                if experiment is not None
                else self.client.create_experiment(self.config.mlflow.experiment)
            )
        if self.parent_id is None:
            self.parent_id = self._parent_run()

    def _find(self, extra_filter: str) -> list:
        query = f"tags.`{SEARCH_TAG}` = '{self.config.name}' and {extra_filter}"
        return self.client.search_runs([self.experiment_id], filter_string=query, max_results=5000)

    def _parent_run(self) -> str:
        existing = self._find(f"tags.`{ROLE_TAG}` = 'parent'")
        if existing:
            return existing[0].info.run_id
        run = self.client.create_run(
            self.experiment_id, run_name=self.config.name, tags={SEARCH_TAG: self.config.name, ROLE_TAG: "parent"}
        )
        config = self.config
        params = {
            "sampler": config.sampler,
            "trials": config.trials,
            "budget.generated_tokens": config.budget.generated_tokens,
            "budget.minutes": config.budget.minutes,
            "workers": config.workers.count,
            "methods": ",".join(config.methods),
            "layer_groups": config.layer_groups,
            "module_filters": config.module_filters,
            "objectives": ",".join(config.objectives.names()),
            "constraints": json.dumps(config.objectives.constraints),
            "storage": config.storage,
            "seed": config.seed,
            **{f"model.{k}": v for k, v in config.models.model_dump().items()},
        }
        self.client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
        self.client.log_dict(run.info.run_id, config.model_dump(mode="json"), "config.json")
        return run.info.run_id

    @property
    def run_url(self) -> str:
        if self.parent_id is None:
            return f"not yet created (MLflow at {self.config.mlflow.tracking_uri} did not answer)"
        uri = self.config.mlflow.tracking_uri.rstrip("/")
        return f"{uri}/#/experiments/{self.experiment_id}/runs/{self.parent_id}"

    def sync_trials_soon(self, study: optuna.Study) -> None:
        """`sync_trials` on a background thread, so the search loop does not wait on MLflow between trials. A
        call while one is still queued adds nothing: the queued one logs every trial finished by the time it runs."""
        if self._queued is not None and not self._queued.running() and not self._queued.done():
            return
        self._queued = self._background.submit(self.sync_trials, study)

    def sync_trials(self, study: optuna.Study) -> int | None:
        """Create a child run for every finished trial that has no complete one yet; returns how many were
        created, None when MLflow did not answer."""
        with self._sync_lock:
            return self._mirrored("log the finished trials", lambda: self._sync_unlocked(study))

    def _sync_unlocked(self, study: optuna.Study) -> int:
        logged = set()
        for run in self._find(f"tags.`{ROLE_TAG}` = 'trial'"):
            if run.data.tags.get(COMPLETE_TAG) == "true":
                logged.add(run.data.tags.get(TRIAL_TAG))
            else:  # cut off mid-logging by an outage or a crash: removed, and logged again below
                self.client.delete_run(run.info.run_id)
        # A pruned trial too: stopped at an early rung by the multi-fidelity scheduler, with its partial figures
        # (`fidelity` below 1) and the tokens it spent; its run is FINISHED, its `state` tag PRUNED.
        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
        created = 0
        for trial in study.get_trials(deepcopy=False, states=states):
            if str(trial.number) not in logged:
                self._log_trial(trial)
                created += 1
        return created

    def _log_trial(self, trial: optuna.trial.FrozenTrial) -> None:
        metrics = trial.user_attrs.get("metrics", {})
        tags = {
            SEARCH_TAG: self.config.name,
            ROLE_TAG: "trial",
            TRIAL_TAG: str(trial.number),
            "mlflow.parentRunId": self.parent_id,
            "method": str(trial.params.get("method", "")),
            "state": trial.state.name,
            "pareto": "false",
        }
        if "worker" in metrics:
            tags["worker"] = str(int(metrics["worker"]))
        run_name = f"trial-{trial.number} {tags['method']}".rstrip()  # runs are found by tags, never by this name
        run_id = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags).info.run_id
        stamp = int(trial.datetime_complete.timestamp() * 1000)
        values = {key: float(value) for key, value in metrics.items()}
        if trial.datetime_start and trial.datetime_complete:
            values["trial_wall_s"] = (trial.datetime_complete - trial.datetime_start).total_seconds()
        params = [Param(k, v) for k, v in _flat_params(trial).items()]
        self.client.log_batch(
            run_id,
            params=params[:PARAMS_PER_BATCH],
            metrics=[Metric(key, value, stamp, 0) for key, value in values.items()],
        )
        for start in range(PARAMS_PER_BATCH, len(params), PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=params[start : start + PARAMS_PER_BATCH])
        self.client.set_terminated(run_id, status="FAILED" if trial.state.name == "FAIL" else "FINISHED")
        self.client.set_tag(run_id, COMPLETE_TAG, "true")

    def trial_runs(self) -> dict[int, str]:
        runs = self._find(f"tags.`{ROLE_TAG}` = 'trial' and tags.`{COMPLETE_TAG}` = 'true'")
        return {int(run.data.tags[TRIAL_TAG]): run.info.run_id for run in runs}

    def mark_pareto(self, front: Sequence[Point]) -> bool:
        """Tag each trial's run on or off the front; False when MLflow did not answer."""
        on_front = {point.number for point in front}

        return bool(self._mirrored("tag the Pareto front", lambda: self._mark_pareto(on_front)))

    def _mark_pareto(self, on_front: set[int]) -> dict[int, str]:
        """Tag each trial's run; returns the trial runs (number: run id)."""
        runs = self.trial_runs()
        for number, run_id in runs.items():
            self.client.set_tag(run_id, "pareto", "true" if number in on_front else "false")
        return runs

    def mirror_summary(self, study: optuna.Study, summary: dict, artifacts: Path) -> bool:
        """Mirror a finalized search: its trials, front tags, test metrics, parent metrics and artifacts, and a
        registry version (with its aliases) for each front entry that has none yet; fills each entry's
        `registered_model` and `version`. Idempotent. False when MLflow did not answer (the entries not yet
        registered keep `version` None)."""
        if self.sync_trials(study) is None:
            return False

        def mirror() -> bool:
            runs = self._mark_pareto({entry["trial"] for entry in summary["front"]})
            self._log_new_metrics(self.parent_id, summary["parent_metrics"])
            for entry in summary["front"]:
                run_id = runs[entry["trial"]]
                self._log_new_metrics(run_id, {f"test_{k}": v for k, v in entry["test"].items()})
                entry["registered_model"], entry["version"] = self._register_once(entry, run_id, summary, artifacts)
            self.client.log_artifacts(self.parent_id, str(artifacts))
            self._describe(summary, runs)
            summary["mlflow_run"] = self.run_url
            return True

        return bool(self._mirrored("mirror the finalized search", mirror))

    def _log_new_metrics(self, run_id: str, metrics: dict[str, float]) -> None:
        """Log the metrics whose latest value on the run differs: a second finalize adds no history points."""
        latest = self.client.get_run(run_id).data.metrics
        stamp = int(time.time() * 1000)
        new = [Metric(k, float(v), stamp, 0) for k, v in metrics.items() if latest.get(k) != float(v)]
        if new:
            self.client.log_batch(run_id, metrics=new)

    @property
    def registered_model_name(self) -> str:
        return f"{self.config.mlflow.registry_prefix}-{self.config.name}"

    def _versions_of(self, number: int) -> list:
        """The registry versions of trial `number` of this search, oldest first."""
        found = [
            version
            for version in self.client.search_model_versions(f"name = '{self.registered_model_name}'")
            if version.tags.get("trial") == str(number) and version.tags.get(SEARCH_TAG) == self.config.name
        ]
        return sorted(found, key=lambda version: int(version.version))

    def _register_once(self, entry: dict, run_id: str, summary: dict, artifacts: Path) -> tuple[str, int]:
        """The registry version of a front entry, logged and registered only if it has none yet: with the merged
        weights when the entry carries them (`entry["weights"]`: its folder `model_dir`), else recipe-only. A
        trial's version with weights, once there, is the one its aliases point at."""
        name = self.registered_model_name
        existing = self._versions_of(entry["trial"])
        weighted = [version for version in existing if version.tags.get(WEIGHTS_TAG) != "false"]
        if weighted:
            version = weighted[0]
        elif entry.get("weights"):
            version = self._register_weights(entry["trial"], run_id, Path(entry["model_dir"]))
        elif existing:
            version = existing[0]
        else:
            version = self._register_recipe(entry, run_id, summary, artifacts)
        entry["weights"] = version.tags.get(WEIGHTS_TAG) != "false"
        for alias in [*entry["aliases"], *entry.get("picked", [])]:
            self.client.set_registered_model_alias(name, alias, version.version)
        return name, int(version.version)

    def _version_tags(self, number: int, weights: bool) -> dict[str, str]:
        return {"trial": str(number), SEARCH_TAG: self.config.name, WEIGHTS_TAG: str(weights).lower()}

    def _register_weights(self, number: int, run_id: str, model_dir: Path):
        """Log the merged Hugging Face folder in MLflow's transformers flavour (a text-generation pipeline, which
        `mlflow.transformers.load_model` and `mlflow.pyfunc.load_model` both load) and register it."""
        import mlflow.transformers

        with mlflow.start_run(run_id=run_id, experiment_id=self.experiment_id):
            info = mlflow.transformers.log_model(
                transformers_model=str(model_dir),  # a local checkpoint: copied as it is, never loaded here
                name=MODEL_NAME,
                task="text-generation",
                pip_requirements=["transformers", "torch", "safetensors", "accelerate"],
            )
        # Through the client rather than mlflow.register_model, which prints two lines per version on the console.
        return self._create_version(info.model_uri, run_id, self._version_tags(number, True), model_id=info.model_id)

    def _register_recipe(self, entry: dict, run_id: str, summary: dict, artifacts: Path):
        """Log the entry's recipe (mergekit YAML, the recipe, the input models, the dev and test metrics) under
        the trial run's `recipe/` and register that folder as a version without weights."""
        with tempfile.TemporaryDirectory() as scratch:
            folder = Path(scratch) / RECIPE_FOLDER
            write_recipe_folder(entry, summary, artifacts / "recipes" / f"trial-{entry['trial']}.yaml", folder)
            self.client.log_artifacts(run_id, str(folder), RECIPE_FOLDER)
        source = f"{self.client.get_run(run_id).info.artifact_uri.rstrip('/')}/{RECIPE_FOLDER}"
        return self._create_version(source, run_id, self._version_tags(entry["trial"], False))

    def _create_version(self, source: str, run_id: str, tags: dict[str, str], model_id: str | None = None):
        """A new version of the search's registered model (created first if need be) from `source`."""
        name = self.registered_model_name
        try:
            self.client.get_registered_model(name)
        except MlflowException:
            self.client.create_registered_model(name)
        return self.client.create_model_version(name, source, run_id=run_id, tags=tags, model_id=model_id)

    def register_pick(self, summary: dict, entry: dict, alias: str, artifacts: Path) -> bool:
        """A version with weights for a picked front entry (its `model_dir` materialized), the alias set on it and
        the parent's description updated; fills the entry's `version`. False when MLflow did not answer."""

        def register() -> bool:
            runs = self.trial_runs()
            if entry["trial"] not in runs:
                raise MlflowException(f"trial {entry['trial']} has no run yet")
            entry["weights"] = True
            entry["picked"] = sorted({*entry.get("picked", []), alias})
            entry["registered_model"], entry["version"] = self._register_once(
                entry, runs[entry["trial"]], summary, artifacts
            )
            self._describe(summary, runs)
            return True

        return bool(self._mirrored(f"register trial {entry['trial']} as {alias}", register))

    def _describe(self, summary: dict, runs: dict[int, str]) -> None:
        """The parent run's description: the front as a markdown table, with the registry's aliases as they are."""
        try:
            aliases = self.client.get_registered_model(self.registered_model_name).aliases
        except MlflowException:  # nothing registered yet
            aliases = {}
        by_version: dict[str, list[str]] = {}
        for alias, version in aliases.items():
            by_version.setdefault(str(version), []).append(alias)
        text = front_description(summary, self.experiment_id, runs, by_version)
        if self.client.get_run(self.parent_id).data.tags.get(DESCRIPTION_TAG) != text:
            self.client.set_tag(self.parent_id, DESCRIPTION_TAG, text)

    def finish(self, status: str = "FINISHED") -> None:
        """End the parent run once the background sync has ended (its outcome is its own: the search may be ending
        because of another error)."""
        self._background.shutdown(wait=True)
        if self.parent_id is not None:
            self._mirrored("end the parent run", lambda: self.client.set_terminated(self.parent_id, status=status))


def write_recipe_folder(entry: dict, summary: dict, mergekit_yaml: Path, folder: Path) -> None:
    """A recipe-only version's files: the mergekit YAML, the recipe as safemerge reads it, the input models (each
    reference with its revision or the hash of its weights files) and the dev and test metrics."""
    folder.mkdir(parents=True)
    if mergekit_yaml.is_file():  # (finalize exports it; a pareto.json from before the export has none)
        (folder / "mergekit_config.yml").write_text(mergekit_yaml.read_text())
    (folder / "recipe.json").write_text(json.dumps(entry["recipe"], indent=2) + "\n")
    (folder / "inputs.json").write_text(json.dumps(summary.get("inputs", {}), indent=2) + "\n")
    metrics = {"trial": entry["trial"], "method": entry["method"], "dev": entry["dev"], "test": entry["test"]}
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")


def _with_interval(metrics: dict[str, float], name: str) -> str:
    if name not in metrics:
        return ""
    low, high = (metrics.get(key) for key in interval_metrics(name))
    interval = f" [{low:.3f}, {high:.3f}]" if low is not None and high is not None else ""
    return f"{metrics[name]:.3f}{interval}"


def front_description(
    summary: dict, experiment_id: str, runs: dict[int, str], aliases_by_version: dict[str, list[str]]
) -> str:
    """The front as a markdown table (the parent run's description in the MLflow UI): each entry's trial, method,
    dev and test objectives with their 95% intervals where known, a link to its run, its registry version (and
    whether it holds weights) and aliases."""
    measured = {key for entry in summary["front"] for key in entry["dev"]}
    bounds = {key for name in measured for key in interval_metrics(name)}
    per_domain = sorted(key for key in measured - bounds if key.startswith(domain_metric("")))
    per_domain = per_domain if len(per_domain) > 1 else []  # one domain's accuracy is the domain objective
    columns = [name for name in RATE_OBJECTIVES if name in measured] + per_domain
    header = ["trial", "method", *[f"dev {n}" for n in columns], *[f"test {n}" for n in columns], "run", "version"]
    header.append("aliases")
    lines = [
        f"**Pareto front of search `{summary['search']}`** ({summary['sampler']}, {summary['completed']} trials, "
        f"{summary['failed']} failed, hypervolume {summary['hypervolume']:.4f}). Dev: the split the search "
        "tuned on; test: held out. 95% Wilson intervals in brackets. Pick one with "
        f"`safemerge pick {summary['search']} TRIAL --alias production`.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for entry in summary["front"]:
        run_id = runs.get(entry["trial"])
        link = f"[trial-{entry['trial']}](#/experiments/{experiment_id}/runs/{run_id})" if run_id else ""
        version = entry.get("version")
        if version is None:
            registered, aliases = "pending", ""
        else:
            kind = "weights" if entry.get("weights") else "recipe"
            registered = f"{entry['registered_model']} v{version} ({kind})"
            aliases = ", ".join(sorted(aliases_by_version.get(str(version), [])))
        cells = [
            str(entry["trial"]),
            entry["method"],
            *[_with_interval(entry["dev"], name) for name in columns],
            *[_with_interval(entry["test"], name) for name in columns],
            link,
            registered,
            aliases,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def choose_aliases(front: Sequence[Point], objectives) -> dict[int, list[str]]:
    """best-safety, best-domain (when those are objectives) and balanced: the best worst objective, each maximized
    rate taken at the lower bound of its 95% interval where the trial has one (a small dev set's lucky score
    does not win it)."""
    if not front:
        return {}
    aliases: dict[int, list[str]] = {point.number: [] for point in front}
    for name in ("safety", "domain"):
        if name in objectives.maximize:
            best = max(front, key=lambda point: (point.metrics[name], -point.number))
            aliases[best.number].append(f"best-{name}")
    maximized = objectives.maximize or objectives.minimize
    balanced = max(
        front,
        key=lambda point: (
            min(bound(point.metrics, name, upper=False) for name in maximized)
            if objectives.maximize
            else -max(point.metrics[n] for n in maximized),
            -point.number,
        ),
    )
    aliases[balanced.number].append("balanced")
    return aliases


def pareto_plots(
    points: Sequence[Point], front: Sequence[Point], objectives, folder: Path, labels: dict[int, str] | None = None
) -> list[Path]:
    """A PNG (matplotlib) and an interactive HTML (plotly) of the first two objectives."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import plotly.graph_objects as go

    names = objectives.names()
    x_name, y_name = (names + names)[:2]
    on_front = {point.number for point in front}
    labels = labels or {}
    figure, axes = plt.subplots(figsize=(6, 4.5))
    for group, style in (
        ("infeasible", dict(marker="x", color="#d62728", alpha=0.6)),
        ("feasible", dict(marker="o", color="#7f7f7f", alpha=0.6)),
        ("pareto", dict(marker="*", color="#1f77b4", s=140)),
    ):
        chosen = [
            p
            for p in points
            if (group == "pareto" and p.number in on_front)
            or (group == "feasible" and p.feasible and p.number not in on_front)
            or (group == "infeasible" and not p.feasible)
        ]
        if chosen:
            axes.scatter([p.metrics[x_name] for p in chosen], [p.metrics[y_name] for p in chosen], label=group, **style)
    axes.set_xlabel(x_name)
    axes.set_ylabel(y_name)
    axes.set_title("trials and the feasible Pareto front")
    axes.legend()
    png = folder / "pareto.png"
    figure.tight_layout()
    figure.savefig(png, dpi=120)
    plt.close(figure)

    html_figure = go.Figure()
    for group in ("infeasible", "feasible", "pareto"):
        chosen = [
            p
            for p in points
            if (group == "pareto" and p.number in on_front)
            or (group == "feasible" and p.feasible and p.number not in on_front)
            or (group == "infeasible" and not p.feasible)
        ]
        html_figure.add_trace(
            go.Scatter(
                x=[p.metrics[x_name] for p in chosen],
                y=[p.metrics[y_name] for p in chosen],
                mode="markers",
                name=group,
                text=[f"trial {p.number} {labels.get(p.number, '')}" for p in chosen],
            )
        )
    html_figure.update_layout(xaxis_title=x_name, yaxis_title=y_name, title="trials and the feasible Pareto front")
    html = folder / "pareto.html"
    html_figure.write_html(str(html), include_plotlyjs=True)
    return [png, html]
