"""MLflow is a mirror of the Optuna study: a real `mlflow server` on loopback, stopped before, during and after
a search, never stops or fails it; once the server is back every trial is in MLflow, each exactly once, and
finalizing (or syncing) again adds no child run, registry version or metric point."""

from __future__ import annotations

import json
import subprocess

import optuna
import pytest
from mlflow.tracking import MlflowClient

from safemerge.cluster.processes import MlflowServer, free_port
from safemerge.search.tracking import Tracker
from tests.driving import SearchDriver
from tests.test_mlflow_ui import finished_study, ui_config
from tests.test_search import REPO, SAFEMERGE, on_search, search_overrides

BUDGET = 4


@pytest.fixture
def server(tmp_path):
    server = MlflowServer(tmp_path / "mlflow")
    yield server
    server.stop()


def mirrored(server: MlflowServer, name: str) -> dict:
    """What MLflow holds of search `name`: its runs by role, trial numbers of complete child runs, metric history
    lengths, and registry versions."""
    client = MlflowClient(tracking_uri=server.url, registry_uri=server.url)
    experiment = client.get_experiment_by_name("safemerge")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`safemerge.search` = '{name}'")
    trials = [run for run in runs if run.data.tags["safemerge.role"] == "trial"]
    parents = [run for run in runs if run.data.tags["safemerge.role"] == "parent"]
    history = {
        (run.info.run_id, key): len(client.get_metric_history(run.info.run_id, key))
        for run in runs
        for key in run.data.metrics
    }
    versions = client.search_model_versions(f"name = 'safemerge-{name}'")
    return {
        "parents": len(parents),
        "trials": sorted(int(run.data.tags["safemerge.trial"]) for run in trials),
        "complete": all(run.data.tags.get("safemerge.complete") == "true" for run in trials),
        "history": history,
        "versions": sorted((int(v.tags["trial"]), int(v.version)) for v in versions),
    }


def assert_mirror_of(study: optuna.Study, summary: dict, state: dict) -> None:
    assert state["parents"] == 1
    assert state["trials"] == list(range(BUDGET)) and state["complete"], state
    front = sorted(entry["trial"] for entry in summary["front"])
    assert front and [trial for trial, _ in state["versions"]] == front, (state["versions"], front)
    assert all(entry["version"] is not None for entry in summary["front"])
    assert all(count == 1 for count in state["history"].values()), state["history"]


@pytest.mark.vllm
def test_mlflow_down_at_the_start_then_synced_and_finalized_twice_changes_nothing(tmp_path, server, zoo_dir, data_dir):
    name = "mlflow-down"
    args = search_overrides(tmp_path, name, BUDGET, server.url, zoo_dir, data_dir)
    run = subprocess.run(
        [SAFEMERGE, "search", "run", str(REPO / "configs/zoo.yaml"), *args],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"MLflow at {server.url} did not answer" in run.stdout, run.stdout[-3000:]
    assert "pending (MLflow did not answer)" in run.stdout
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path}/optuna.db")
    assert [trial.state for trial in study.trials] == [optuna.trial.TrialState.COMPLETE] * BUDGET
    summary_path = tmp_path / "searches" / name / "pareto.json"
    assert all(entry["version"] is None for entry in json.loads(summary_path.read_text())["front"])

    # Still down: sync says so, exit 2, and changes nothing.
    refused = on_search(tmp_path, "sync", name)
    assert refused.returncode == 2 and "does not answer" in refused.stderr, refused.stderr

    server.start()
    synced = on_search(tmp_path, "sync", name)
    assert synced.returncode == 0, synced.stdout[-3000:] + synced.stderr[-3000:]
    summary = json.loads(summary_path.read_text())
    state = mirrored(server, name)
    assert_mirror_of(study, summary, state)

    # Finalize again (resume of a finished search) and sync again: nothing new in MLflow, the same summary.
    resumed = on_search(tmp_path, "resume", name)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"{name}: an earlier finalize had tested and recorded this front; no worker started" in resumed.stdout
    assert on_search(tmp_path, "sync", name).returncode == 0
    assert mirrored(server, name) == state
    again = json.loads(summary_path.read_text())
    assert [(e["trial"], e["version"], e["test"]) for e in again["front"]] == [
        (e["trial"], e["version"], e["test"]) for e in summary["front"]
    ]


@pytest.mark.vllm
def test_mlflow_stopped_mid_search_and_at_finalize_loses_no_trial(tmp_path, server, zoo_dir, data_dir):
    name = "mlflow-flaky"
    server.start()
    args = search_overrides(tmp_path, name, BUDGET, server.url, zoo_dir, data_dir)
    driver = SearchDriver([SAFEMERGE, "search", "run", str(REPO / "configs/zoo.yaml"), *args], tmp_path)
    try:
        assert driver.wait_for_line("[1/"), driver.output
        server.stop()  # down for trials 2 and 3
        assert driver.wait_for_line("[3/"), driver.output
        server.start()
        assert driver.wait_for_line(f"[{BUDGET}/"), driver.output
        server.stop()  # and down again for finalize, unless finalize was quicker
        returncode = driver.finish()
    finally:
        driver.kill()
    assert returncode == 0, driver.output[-3000:]
    assert f"MLflow at {server.url} did not answer" in driver.output, driver.output[-3000:]
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path}/optuna.db")
    assert [trial.state for trial in study.trials] == [optuna.trial.TrialState.COMPLETE] * BUDGET

    server.start()
    synced = on_search(tmp_path, "sync", name)
    assert synced.returncode == 0, synced.stdout[-3000:] + synced.stderr[-3000:]
    summary = json.loads((tmp_path / "searches" / name / "pareto.json").read_text())
    state = mirrored(server, name)
    assert_mirror_of(study, summary, state)
    assert on_search(tmp_path, "sync", name).returncode == 0
    assert mirrored(server, name) == state


def test_a_child_run_cut_off_mid_logging_is_logged_again_once(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    study = finished_study(3)
    tracker = Tracker(ui_config(uri))
    assert tracker.sync_trials(study) == 3
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    cut_off = tracker.trial_runs()[1]
    client.delete_tag(cut_off, "safemerge.complete")  # as a crash or an outage mid-logging leaves a run
    assert sorted(tracker.trial_runs()) == [0, 2]
    assert tracker.sync_trials(study) == 1  # trial 1 again, nothing else
    runs = tracker.trial_runs()
    assert sorted(runs) == [0, 1, 2] and runs[1] != cut_off
    assert client.get_run(cut_off).info.lifecycle_stage == "deleted"
    assert tracker.sync_trials(study) == 0
    tracker.finish()


def test_mlflow_not_answering_is_one_line_and_no_error(tmp_path):
    lines: list[str] = []
    url = f"http://127.0.0.1:{free_port()}"
    tracker = Tracker(ui_config(url), lines.append)
    assert tracker.sync_trials(finished_study(2)) is None
    assert not tracker.mark_pareto([])
    tracker.finish()
    assert len(lines) == 1 and lines[0].startswith(f"MLflow at {url} did not answer"), lines
    assert "safemerge search sync ui-check" in lines[0]
