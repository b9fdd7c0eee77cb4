"""The search: config validation, the define-by-run space, the Pareto front, and whole searches with real
Ray, real vLLM workers, a real Optuna storage and a real `mlflow server` on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from safemerge.errors import UserError
from safemerge.merges.methods import searchable_methods, searched_params
from safemerge.merges.recipe import parse_recipe
from safemerge.search.config import ObjectivesConfig, SearchConfig, load_config
from safemerge.search.pareto import Point, hypervolume, pareto_front
from safemerge.search.space import GRID_SPACE, grid_recipe, standard_points, suggest_recipe
from tests.conftest import mlflow_at

SEARCHABLE_METHODS = searchable_methods()

REPO = Path(__file__).resolve().parents[1]
SAFEMERGE = str(Path(sys.executable).parent / "safemerge")


# What the libraries printed on a search's console before it was quieted (search/progress.py).
BANNERS = (
    "Configuration for experiment",
    "tensorboard",
    "Token authentication",
    "[I 20",
    "ExperimentalWarning",
    "View run",
    "View experiment",
    " INFO ",
    "Downloading artifacts",
)


def zoo_config(**overrides) -> SearchConfig:
    return load_config(REPO / "configs" / "zoo.yaml", overrides)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"methods": ["ties", "frobnicate"]}, "methods: unknown or unsearchable method 'frobnicate'"),
        ({"objectives": {"maximize": ["safety"], "constraints": {"over_refusal": "< 0.1"}}}, "'<= 0.1'"),
        ({"objectives": {"maximize": ["kindness"]}}, "unknown objective 'kindness'"),
        ({"sampler": "cmaes"}, "minimize: [combined]"),
        ({"trials": 0}, "trials"),
        ({"workers": {"count": 2, "gpu": 1}}, "workers.gpu"),
        ({"models": {"base": "zoo:base", "aligned": "zoo:aligned", "experts": {}}}, "models.experts"),
    ],
)
def test_bad_config_names_the_field(overrides, fragment):
    with pytest.raises(UserError) as error:
        zoo_config(**overrides)
    assert fragment in str(error.value)
    assert "zoo.yaml" in str(error.value)


def test_missing_config_and_zoo_model_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    config = zoo_config(zoo_dir=str(tmp_path))
    with pytest.raises(UserError, match="safemerge zoo build"):
        config.resolve_model("zoo:base")


@pytest.mark.parametrize("method", [m for m in SEARCHABLE_METHODS if m != "slerp"] + ["slerp"])
@pytest.mark.parametrize("layer_groups, module_filters", [(1, False), (2, True), (4, True)])
def test_every_method_of_the_space_builds_a_valid_recipe(method, layer_groups, module_filters):
    config = zoo_config(methods=[method], layer_groups=layer_groups, module_filters=module_filters)
    study = optuna.create_study(directions=["maximize", "maximize"], sampler=optuna.samplers.RandomSampler(seed=1))
    trial = study.ask()
    recipe = suggest_recipe(trial, config, num_layers=4)
    parsed = parse_recipe(recipe)
    assert parsed.merge_method == method
    names = trial.params
    assert names["method"] == method
    if not any(param.search.layered for param in searched_params(method)):
        return  # (karcher, arcee_fusion, ram: nothing per layer to search)
    per_group = [name for name in names if name.endswith(f".g{layer_groups - 1}")]
    assert per_group, "each layer group gets its own coefficient"
    if module_filters:
        assert any(".self_attn." in name for name in names) and any(".mlp." in name for name in names)


def leaves(setting) -> list[float]:
    """Every number in a recipe parameter: a scalar, a per-layer list, or a filtered list of those."""
    if isinstance(setting, dict):
        return leaves(setting["value"])
    if isinstance(setting, list):
        return [value for item in setting for value in leaves(item)]
    return [setting]


def test_warm_start_is_each_methods_standard_recipe():
    methods = ["task_arithmetic", "ties", "dare_ties", "mergealign", "slerp"]
    config = zoo_config(methods=methods, layer_groups=2, module_filters=True)
    points = standard_points(config, num_layers=4)
    assert [point["method"] for point in points] == methods
    for point in points:
        recipe = suggest_recipe(optuna.trial.FixedTrial(point), config, num_layers=4)
        parse_recipe(recipe)
        for model in recipe["models"]:
            for name, setting in model.get("parameters", {}).items():
                expected = {"weight": 1.0, "density": 0.5, "lambda_align": 1.0, "lambda_domain": 1.0}[name]
                assert set(leaves(setting)) == {expected}, (point["method"], name)
        if point["method"] == "slerp":
            assert set(leaves(recipe["parameters"]["t"])) == {0.5}


def test_grid_space_is_the_papers_density_by_weight_grid():
    config = zoo_config(sampler="grid")
    study = optuna.create_study(directions=["maximize", "maximize"], sampler=optuna.samplers.GridSampler(GRID_SPACE))
    seen = set()
    for _ in range(25):
        trial = study.ask()
        recipe = grid_recipe(trial, config, 4)
        weight, density = trial.params["grid.weight"], trial.params["grid.density"]
        assert {entry["parameters"]["weight"] for entry in recipe["models"]} == {weight}
        seen.add((weight, density))  # running trials count as visited: 25 asks cover the grid
    assert len(seen) == 25


def test_pareto_front_keeps_feasible_non_dominated_points_and_its_hypervolume():
    objectives = ObjectivesConfig(maximize=["safety", "domain"], constraints={"over_refusal": "<= 0.1"})
    points = [
        Point(0, {"safety": 0.9, "domain": 0.2, "over_refusal": 0.0}, True),
        Point(1, {"safety": 0.5, "domain": 0.6, "over_refusal": 0.05}, True),
        Point(2, {"safety": 0.4, "domain": 0.5, "over_refusal": 0.0}, True),  # dominated by 1
        Point(3, {"safety": 1.0, "domain": 1.0, "over_refusal": 0.9}, False),  # refuses everything: infeasible
    ]
    front = pareto_front(points, objectives)
    assert [p.number for p in front] == [0, 1]
    # Area dominated by (0.9, 0.2) and (0.5, 0.6) above the origin: 0.9*0.2 + 0.5*(0.6-0.2).
    assert hypervolume(points, objectives) == pytest.approx(0.9 * 0.2 + 0.5 * 0.4)
    assert objectives.violations({"over_refusal": 0.3}) == [pytest.approx(0.2)]


def search_overrides(
    tmp_path: Path, name: str, trials: int, tracking_uri: str, zoo_dir: Path, data_dir: Path, quick: bool = True
) -> list[str]:
    """CLI options for a search whose stores live in tmp_path; `quick`: 10 prompts a set, two methods."""
    values = {
        "storage": f"sqlite:///{tmp_path}/optuna.db",
        "mlflow.tracking_uri": tracking_uri,
        "results_dir": str(tmp_path / "searches"),
        "zoo_dir": str(zoo_dir),
        "data": str(data_dir),
    }
    if quick:
        values.update({"evaluation.limit": 10, "methods": "[task_arithmetic, ties]"})
    args = ["--name", name, "--trials", str(trials)]
    for key, value in values.items():
        args += ["--set", f"{key}={value}"]
    return args


def run_zoo_search(tmp_path: Path, args: list[str]) -> subprocess.CompletedProcess:
    """`safemerge search run configs/zoo.yaml ARGS` (`search_overrides` and more), run in tmp_path."""
    return subprocess.run(
        [SAFEMERGE, "search", "run", str(REPO / "configs/zoo.yaml"), *args],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )


def on_search(tmp_path: Path, verb: str, name: str) -> subprocess.CompletedProcess:
    """`safemerge search VERB NAME` (resume, sync) on a search whose folder is under tmp_path (`search_overrides`)."""
    return subprocess.run(
        [SAFEMERGE, "search", verb, name, "--results-dir", str(tmp_path / "searches")],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )


def feasible_front(study: optuna.Study, over_refusal_bound: float = 0.1) -> set[int]:
    """The trial numbers of a safety/domain study's feasible Pareto front, from its trials' metrics: feasible when
    over_refusal <= the bound; off the front when another feasible trial is at least as good on both objectives
    and differs (ties both stay)."""
    scores = {
        trial.number: (trial.user_attrs["metrics"]["safety"], trial.user_attrs["metrics"]["domain"])
        for trial in study.trials
        if trial.state == optuna.trial.TrialState.COMPLETE
        and trial.user_attrs["metrics"]["over_refusal"] <= over_refusal_bound
    }
    return {
        number
        for number, (safety, domain) in scores.items()
        if not any(s >= safety and d >= domain and (s, d) != (safety, domain) for s, d in scores.values())
    }


@pytest.mark.vllm
def test_search_against_a_real_mlflow_server(tmp_path, mlflow_server, zoo_dir, data_dir):
    name = "e2e"
    storage = f"sqlite:///{tmp_path}/optuna.db"
    # A user's warm start that cannot merge: an overflowing weight. The search must record it as failed.
    study = optuna.create_study(study_name=name, storage=storage, directions=["maximize", "maximize"])
    study.enqueue_trial({"method": "task_arithmetic", "task_arithmetic.aligned.weight.self_attn.g0": 1e39})
    result = run_zoo_search(tmp_path, search_overrides(tmp_path, name, 5, mlflow_server, zoo_dir, data_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[5/5]" in result.stdout and "failed 1" in result.stdout
    # Off a terminal, one line per finished trial and none of the libraries' banners (all seen here before
    # search/progress.py quieted them): Ray Tune's experiment box and TensorBoard hint, Ray's token notice, Optuna's
    # info lines and experimental warning, MLflow's run links, INFO lines and download bars.
    console = result.stdout + result.stderr
    assert [line.split("]")[0] for line in result.stdout.splitlines() if line.startswith("[")] == [
        f"[{done}/5" for done in range(1, 6)
    ], console[-3000:]
    for banner in BANNERS:
        assert banner not in console, (banner, console[-3000:])
    study = optuna.load_study(study_name=name, storage=storage)
    states = [trial.state for trial in study.trials]
    assert len(states) == 5
    assert states[0] == optuna.trial.TrialState.FAIL
    assert states.count(optuna.trial.TrialState.COMPLETE) == 4

    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    experiment = client.get_experiment_by_name("safemerge")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.`safemerge.search` = 'e2e'")
    parents = [r for r in runs if r.data.tags["safemerge.role"] == "parent"]
    children = [r for r in runs if r.data.tags["safemerge.role"] == "trial"]
    assert len(parents) == 1 and len(children) == 5
    assert all(c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for c in children)
    front = feasible_front(study)  # computed here from the trials, not read from the tracker
    assert front, "some trial of the zoo search meets the over-refusal constraint"
    assert {c.data.tags["safemerge.trial"]: c.data.tags["pareto"] for c in children} == {
        str(number): "true" if number in front else "false" for number in range(5)
    }
    summary = json.loads((tmp_path / "searches" / name / "pareto.json").read_text())
    assert sorted(entry["trial"] for entry in summary["front"]) == sorted(front)
    on_front = [c for c in children if c.data.tags["pareto"] == "true"]
    assert all("test_safety" in c.data.metrics for c in on_front)
    failed = [c for c in children if c.info.status == "FAILED"]
    assert len(failed) == 1 and failed[0].data.tags["safemerge.trial"] == "0"
    finished = [c for c in children if c.info.status == "FINISHED"]
    assert all({"safety", "domain", "over_refusal", "ce_safety"} <= set(c.data.metrics) for c in finished)
    assert all("method" in c.data.params for c in finished)

    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"pareto.png", "pareto.html", "hypervolume.json", "similarity.txt", "recipes"} <= artifacts
    recipes = client.list_artifacts(parents[0].info.run_id, "recipes")
    assert len(recipes) == len(on_front)

    registered = f"safemerge-{name}"
    versions = client.search_model_versions(f"name = '{registered}'")
    assert len(versions) == len(on_front)
    model = client.get_registered_model(registered)
    assert {"best-safety", "best-domain", "balanced"} <= set(model.aliases)
    # The aliased merges carry weights (transformers flavour); the chosen one answers through pyfunc too.
    with mlflow_at(mlflow_server):
        loaded = mlflow.pyfunc.load_model(f"models:/{registered}@balanced")
    assert len(loaded.predict(["How do I boil an egg?"])) == 1

    pareto = subprocess.run(
        [SAFEMERGE, "pareto", name, "--results-dir", str(tmp_path / "searches")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert pareto.returncode == 0 and registered in pareto.stdout and "test safety" in pareto.stdout


@pytest.mark.vllm
def test_a_multi_fidelity_search_records_its_pruned_trials_with_their_partial_figures(tmp_path, zoo_dir, data_dir):
    """A real search in two rungs on the zoo: a trial whose optimistic bounds break a constraint at its first rung
    (here domain >= 0.5 for a merge given no domain vector) stops there, and is recorded, in the study and in
    MLflow, as pruned with its partial figures and the tokens it spent; the front holds whole-split trials only."""
    name, storage = "multi-fidelity", f"sqlite:///{tmp_path}/optuna.db"
    standard = standard_points(zoo_config(), 4)[0]  # task arithmetic 1/1: domain far above 0.5
    no_domain = {**standard, **{key: 0.0 for key in standard if ".medical." in key}}
    study = optuna.create_study(study_name=name, storage=storage, directions=["maximize", "maximize"])
    study.enqueue_trial(standard)
    study.enqueue_trial(no_domain)
    args = search_overrides(tmp_path, name, 4, f"sqlite:///{tmp_path}/mlflow.db", zoo_dir, data_dir, quick=False)
    # 40 prompts a set: a first rung of 10 domain questions, whose upper bound at 0 right is below 0.5.
    args += ["--set", "evaluation.limit=40", "--set", "methods=[task_arithmetic, ties]"]
    args += ["--set", "evaluation.rungs=[0.25, 1.0]", "--set", "objectives.constraints.domain='>= 0.5'"]
    result = run_zoo_search(tmp_path, args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pruned at 0.25 of the dev split" in result.stdout, result.stdout
    study = optuna.load_study(study_name=name, storage=storage)
    states = {trial.number: trial.state for trial in study.trials}
    assert len(states) == 4 and states[0] == optuna.trial.TrialState.COMPLETE, states
    assert states[1] == optuna.trial.TrialState.PRUNED, states
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    for trial in pruned:
        metrics = trial.user_attrs["metrics"]
        assert metrics["fidelity"] == 0.25 and metrics["generated_tokens"] > 0
        assert {"safety", "domain", "domain_hi", "over_refusal"} <= set(metrics)
    assert study.trials[1].user_attrs["metrics"]["domain_hi"] < 0.5
    assert study.trials[0].user_attrs["metrics"]["fidelity"] == 1.0
    assert f"{len(pruned)} pruned" in result.stdout

    summary = json.loads((tmp_path / "searches" / name / "pareto.json").read_text())
    assert summary["front"] and {entry["trial"] for entry in summary["front"]}.isdisjoint(t.number for t in pruned)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("safemerge")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`safemerge.search` = '{name}'")
    children = {int(r.data.tags["safemerge.trial"]): r for r in runs if r.data.tags["safemerge.role"] == "trial"}
    assert set(children) == set(states)  # every trial has its run, the pruned ones included
    for trial in pruned:
        run = children[trial.number]
        assert run.data.tags["state"] == "PRUNED" and run.info.status == "FINISHED"
        assert run.data.tags["pareto"] == "false" and run.data.metrics["fidelity"] == 0.25


@pytest.mark.vllm
def test_a_search_over_the_safety_aware_and_new_methods_runs_end_to_end(tmp_path, zoo_dir, data_dir):
    """Each method's standard recipe as the warm start (one trial each), then its front materialized and exported:
    selective_layers by a worker (its layers come from the weights), as mergekit's task_arithmetic."""
    methods = ["safety_vector", "selective_layers", "nearswap", "sce"]
    name, storage = "new-methods", f"sqlite:///{tmp_path}/optuna.db"
    args = search_overrides(tmp_path, name, len(methods), f"sqlite:///{tmp_path}/mlflow.db", zoo_dir, data_dir)
    args += ["--set", f"methods=[{', '.join(methods)}]"]
    result = run_zoo_search(tmp_path, args)
    assert result.returncode == 0, result.stderr[-3000:]
    # A sqlite store: the command that serves it, with its absolute path, instead of a path with a URL fragment.
    assert f"`mlflow ui --backend-store-uri sqlite:///{tmp_path / 'mlflow.db'}`" in result.stdout, result.stdout
    study = optuna.load_study(study_name=name, storage=storage)
    assert [trial.params["method"] for trial in study.trials] == methods
    assert all(trial.state == optuna.trial.TrialState.COMPLETE for trial in study.trials)
    summary = json.loads((tmp_path / "searches" / name / "pareto.json").read_text())
    assert summary["front"]
    recipes = tmp_path / "searches" / name / "mlflow-artifacts" / "recipes"
    for entry in summary["front"]:
        exported = yaml.safe_load((recipes / f"trial-{entry['trial']}.yaml").read_text())
        expected = {"safety_vector": "dare_linear", "selective_layers": "task_arithmetic"}.get(entry["method"])
        assert exported["merge_method"] == (expected or entry["method"]), entry["method"]
        assert set(entry["test"]) >= {"safety", "domain", "over_refusal"}


@pytest.mark.vllm
def test_a_second_driver_refuses_and_a_killed_one_resumes_to_exactly_the_budget(tmp_path, zoo_dir, data_dir):
    name, budget, lease_s = "resumed", 12, 10
    storage = f"sqlite:///{tmp_path}/optuna.db"
    args = search_overrides(tmp_path, name, budget, f"sqlite:///{tmp_path}/mlflow.db", zoo_dir, data_dir)
    # 40 prompts a set: trials of seconds, so the search is still running when the second driver has been refused.
    args += ["--set", f"lease_timeout_s={lease_s}", "--set", "evaluation.limit=40"]
    command = [SAFEMERGE, "search", "run", str(REPO / "configs/zoo.yaml"), *args]
    driver = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path, start_new_session=True
    )
    deadline = time.time() + 600
    completed, second = 0, None
    while time.time() < deadline and driver.poll() is None:
        time.sleep(1)
        try:
            study = optuna.load_study(study_name=name, storage=storage)
            completed = len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)))
        except KeyError:  # the study does not exist yet
            continue
        if completed >= 1 and second is None:  # the first driver is searching: a second one on the same name
            second = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        if second is not None and completed >= 2:
            break
    assert driver.poll() is None, "the driver finished before it could be killed"
    assert second is not None and second.returncode == 2, (second.returncode, second.stderr[-2000:])
    errors = [line for line in second.stderr.splitlines() if line.startswith("safemerge: error:")]
    assert len(errors) == 1 and "is being run by another driver" in errors[0], second.stderr[-2000:]
    os.killpg(driver.pid, signal.SIGKILL)
    killed_at = time.time()
    driver.wait()
    assert 2 <= completed < budget

    early = subprocess.run(  # the dead driver's lease is still fresh: resume refuses rather than race it
        [SAFEMERGE, "search", "resume", name, "--results-dir", str(tmp_path / "searches")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    if time.time() - killed_at < lease_s - 2:  # (a slow start can let the lease go stale first)
        assert early.returncode == 2 and "resume the search once its lease is stale" in early.stderr, early.stderr
    time.sleep(max(0.0, lease_s + 1 - (time.time() - killed_at)))
    resumed = on_search(tmp_path, "resume", name)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    study = optuna.load_study(study_name=name, storage=storage)
    assert len(study.trials) == budget
    assert all(trial.state == optuna.trial.TrialState.COMPLETE for trial in study.trials)
    params = [tuple(sorted(trial.params.items())) for trial in study.trials]
    assert len(set(params)) == budget  # none ran twice
    # Both URIs: an earlier search in this process set MLflow's default registry URI, which the client would take.
    mlflow_uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=mlflow_uri, registry_uri=mlflow_uri)
    experiment = client.get_experiment_by_name("safemerge")
    children = client.search_runs([experiment.experiment_id], filter_string="tags.`safemerge.role` = 'trial'")
    assert sorted(int(c.data.tags["safemerge.trial"]) for c in children) == list(range(budget))
    # One registry version per front trial, though two drivers ran the search: the finalize that ran is its only one.
    summary = json.loads((tmp_path / "searches" / name / "pareto.json").read_text())
    front = {entry["trial"] for entry in summary["front"]}
    versions = [int(v.tags["trial"]) for v in client.search_model_versions(f"name = 'safemerge-{name}'")]
    assert sorted(versions) == sorted(front), (versions, front, resumed.stdout[-3000:], resumed.stderr[-3000:])
