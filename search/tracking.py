"""MLflow tracking of a search: one parent run, one child run per finished trial (synced from the Optuna
study, so it is idempotent across resumes), Pareto tags, artifacts, and the registry entries of the chosen
merges with the aliases best-safety, best-domain and balanced."""

from __future__ import annotations

import json
import tempfile
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import mlflow
import optuna
from mlflow.tracking import MlflowClient

from safemerge.search.config import SearchConfig
from safemerge.search.pareto import Point

SEARCH_TAG = "safemerge.search"
ROLE_TAG = "safemerge.role"
TRIAL_TAG = "safemerge.trial"


def _flat_params(trial: optuna.trial.FrozenTrial) -> dict[str, str]:
    return {name: str(value) for name, value in trial.params.items()}


class Tracker:
    def __init__(self, config: SearchConfig) -> None:
        self.config = config
        # Both URIs pinned to the config: an inherited MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI must not win.
        mlflow.set_tracking_uri(config.mlflow.tracking_uri)
        mlflow.set_registry_uri(config.mlflow.tracking_uri)
        self.client = MlflowClient(tracking_uri=config.mlflow.tracking_uri, registry_uri=config.mlflow.tracking_uri)
        experiment = self.client.get_experiment_by_name(config.mlflow.experiment)
        self.experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else self.client.create_experiment(config.mlflow.experiment)
        )
        self.parent_id = self._parent_run()
        self._start_background()

    def _start_background(self) -> None:
        self._sync_lock = threading.Lock()
        self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-sync")
        self._queued: Future | None = None

    # Tune pickles its callbacks (and so this tracker) into the experiment state: the thread parts stay behind.
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_sync_lock", "_background", "_queued")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._start_background()

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
        for key, value in params.items():
            self.client.log_param(run.info.run_id, key, str(value)[:6000])
        self.client.log_dict(run.info.run_id, config.model_dump(mode="json"), "config.json")
        return run.info.run_id

    @property
    def run_url(self) -> str:
        uri = self.config.mlflow.tracking_uri.rstrip("/")
        return f"{uri}/#/experiments/{self.experiment_id}/runs/{self.parent_id}"

    def sync_trials_soon(self, study: optuna.Study) -> None:
        """`sync_trials` on a background thread, so the search loop does not wait on MLflow between trials. A
        call while one is still queued adds nothing: the queued one logs every trial finished by the time it runs."""
        if self._queued is not None and not self._queued.running() and not self._queued.done():
            return
        self._queued = self._background.submit(self._sync, study)

    def sync_trials(self, study: optuna.Study) -> int:
        """Create a child run for every finished trial that has none yet; returns how many were created. Waits
        for a background sync first, and raises its error if it failed."""
        if self._queued is not None:
            self._queued.result()
        return self._sync(study)

    def _sync(self, study: optuna.Study) -> int:
        with self._sync_lock:
            return self._sync_unlocked(study)

    def _sync_unlocked(self, study: optuna.Study) -> int:
        logged = {run.data.tags.get(TRIAL_TAG) for run in self._find(f"tags.`{ROLE_TAG}` = 'trial'")}
        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)
        created = 0
        for trial in study.get_trials(deepcopy=False, states=states):
            if str(trial.number) in logged:
                continue
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
            run = self.client.create_run(self.experiment_id, run_name=f"trial-{trial.number}", tags=tags)
            params = _flat_params(trial)
            items = list(params.items())
            for start in range(0, len(items), 100):
                self.client.log_batch(
                    run.info.run_id, params=[mlflow.entities.Param(k, v) for k, v in items[start : start + 100]]
                )
            self.client.log_batch(
                run.info.run_id,
                metrics=[
                    mlflow.entities.Metric(key, float(value), int(trial.datetime_complete.timestamp() * 1000), 0)
                    for key, value in metrics.items()
                ],
            )
            if trial.datetime_start and trial.datetime_complete:
                duration = (trial.datetime_complete - trial.datetime_start).total_seconds()
                self.client.log_metric(run.info.run_id, "trial_wall_s", duration)
            self.client.set_terminated(
                run.info.run_id, status="FINISHED" if trial.state.name == "COMPLETE" else "FAILED"
            )
            created += 1
        return created

    def trial_runs(self) -> dict[int, str]:
        return {int(run.data.tags[TRIAL_TAG]): run.info.run_id for run in self._find(f"tags.`{ROLE_TAG}` = 'trial'")}

    def mark_pareto(self, front: Sequence[Point]) -> None:
        on_front = {point.number for point in front}
        for number, run_id in self.trial_runs().items():
            self.client.set_tag(run_id, "pareto", "true" if number in on_front else "false")

    def log_test_metrics(self, number: int, metrics: dict[str, float]) -> None:
        run_id = self.trial_runs()[number]
        for key, value in metrics.items():
            self.client.log_metric(run_id, f"test_{key}", float(value))

    def log_artifacts(self, folder: Path) -> None:
        self.client.log_artifacts(self.parent_id, str(folder))

    def register(self, number: int, model_dir: Path, aliases: Sequence[str]) -> tuple[str, int]:
        """Log a merged model folder on its trial's run and register it; returns (name, version)."""
        from safemerge.evaluators.pyfunc import MergedChatModel

        run_id = self.trial_runs()[number]
        name = f"{self.config.mlflow.registry_prefix}-{self.config.name}"
        with mlflow.start_run(run_id=run_id, experiment_id=self.experiment_id):
            info = mlflow.pyfunc.log_model(
                name="merged_model",
                python_model=MergedChatModel(),
                artifacts={"model_dir": str(model_dir)},
                pip_requirements=["safemerge", "torch", "transformers", "safetensors"],
            )
        version = mlflow.register_model(info.model_uri, name, tags={"trial": str(number)})
        for alias in aliases:
            self.client.set_registered_model_alias(name, alias, version.version)
        return name, int(version.version)

    def finish(self, status: str = "FINISHED") -> None:
        """End the parent run; a background sync still running ends first (its error is not raised here: the
        search may be ending because of another one)."""
        self._background.shutdown(wait=True)
        self.client.set_terminated(self.parent_id, status=status)


def choose_aliases(front: Sequence[Point], objectives) -> dict[int, list[str]]:
    """best-safety, best-domain (when those are objectives) and balanced (the best worst objective)."""
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
            min(point.metrics[name] for name in maximized)
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


def scratch_folder() -> Path:
    return Path(tempfile.mkdtemp(prefix="safemerge-artifacts-"))
