"""A person picks a merge in the MLflow UI: the search's runs listed, the parent run's description holding the
front as a table beside the Pareto plot (headless Chromium against a real `mlflow server`), kilobyte recipe-only
versions for the front entries nobody picked, and `safemerge pick` registering one with its weights, which
`mlflow.transformers.load_model` loads and which answers a prompt."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import mlflow
import optuna
import pytest
from mlflow.tracking import MlflowClient

from safemerge.search.run import with_weights
from safemerge.search.tracking import DESCRIPTION_TAG, WEIGHTS_TAG, Tracker
from tests.conftest import mlflow_at
from tests.test_search import REPO, SAFEMERGE, search_overrides, zoo_config

FRONT_SEARCH = "ui-front"
RECIPE_ONLY_MAX_BYTES = 64 * 1024  # a recipe-only version: mergekit YAML, recipe, inputs, metrics
WEIGHTS_MIN_BYTES = 1024 * 1024  # a zoo merge's weights are megabytes


def tracked_search(tracking_uri: str, trials: int) -> Tracker:
    """A finished study's trials synced to MLflow by the tracker the search uses."""
    tracker = Tracker(ui_config(tracking_uri))
    assert tracker.sync_trials(finished_study(trials)) == trials
    tracker.finish()
    return tracker


def ui_config(tracking_uri: str):
    return zoo_config(name="ui-check", **{"mlflow.tracking_uri": tracking_uri, "mlflow.experiment": "safemerge-ui"})


def finished_study(trials: int) -> optuna.Study:
    """An in-memory study of `trials` COMPLETE trials with the metrics a search keeps."""
    study = optuna.create_study(directions=["maximize", "maximize"])
    for number in range(trials):
        trial = study.ask()
        trial.suggest_categorical("method", ["ties"])
        trial.suggest_float("ties.aligned.weight.g0", 0.0, 1.5)
        metrics = {"safety": number / trials, "domain": 1 - number / trials, "over_refusal": 0.0}
        trial.set_user_attr("metrics", metrics)
        study.tell(trial, [metrics["safety"], metrics["domain"]])
    return study


def chromium_browser():
    """Headless Chromium driven by selenium (Debian's chromium and chromium-driver)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or chromedriver is None:
        pytest.fail("Debian's chromium and chromium-driver are needed: scripts/test.sh installs them as root")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1200",
    ):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(chromedriver), options=options)


def page_text(driver) -> str:
    return driver.find_element("tag name", "body").text


def test_mlflow_ui_lists_the_search_runs(mlflow_server):
    from selenium.webdriver.support.ui import WebDriverWait

    trials = 3
    tracker = tracked_search(mlflow_server, trials)
    browser = chromium_browser()
    try:
        browser.get(f"{mlflow_server}/#/experiments/{tracker.experiment_id}/runs")
        expected = f"{trials + 1} matching runs"  # the parent and one child per trial
        # The count renders before the grid's rows: wait for both, the parent run listed by the search's name.
        WebDriverWait(browser, 90).until(
            lambda driver: expected in page_text(driver) and "ui-check" in page_text(driver)
        )
    finally:
        browser.quit()


def test_the_parent_run_logs_its_config_without_secrets(tmp_path, monkeypatch):
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(name, "")  # (restored after the test: the config below sets them)
    storage_password, server_password = "storage-secret-4711", "mlflow-secret-0815"
    config = zoo_config(
        name="secrets",
        storage=f"postgresql://optuna:{storage_password}@127.0.0.1:5432/optuna",
        **{"mlflow.tracking_uri": f"https://someone:{server_password}@mlflow.invalid"},
    )
    assert config.mlflow.tracking_uri == "https://mlflow.invalid"  # the credentials moved to MLflow's environment
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == server_password
    # Logged to a local store instead of that server: the rest of the config as the search logs it.
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.chdir(tmp_path)  # the run's artifacts land under ./mlruns
    tracker = Tracker(config.model_copy(update={"mlflow": config.mlflow.model_copy(update={"tracking_uri": uri})}))
    tracker.finish()
    run = tracker.client.get_run(tracker.parent_id)
    logged = json.dumps(run.data.params) + json.dumps(run.data.tags)
    logged += Path(tracker.client.download_artifacts(tracker.parent_id, "config.json", str(tmp_path))).read_text()
    assert "postgresql://optuna@127.0.0.1:5432/optuna" in logged
    assert storage_password not in logged and server_password not in logged
    stored = [path for path in tmp_path.rglob("*") if path.is_file() and storage_password.encode() in path.read_bytes()]
    assert not stored, stored


@pytest.fixture(scope="module")
def front_search(tmp_path_factory, mlflow_server, zoo_dir, data_dir) -> tuple[Path, dict]:
    """The smallest search with a front to pick from (3 trials, 10 prompts a set), finalized against the
    `mlflow server` with `register: recipes` (on the zoo its front is often one trial, which the default mode
    registers with weights, as it carries every alias: recipes mode leaves every entry to pick); its folder and
    pareto.json."""
    folder = tmp_path_factory.mktemp("ui-front")
    args = search_overrides(folder, FRONT_SEARCH, 3, mlflow_server, zoo_dir, data_dir) + ["--set", "register=recipes"]
    result = subprocess.run(
        [SAFEMERGE, "search", "run", str(REPO / "configs/zoo.yaml"), *args],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=folder,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return folder, json.loads((folder / "searches" / FRONT_SEARCH / "pareto.json").read_text())


def version_sizes(client: MlflowClient, name: str, scratch: Path) -> dict[int, tuple[bool, str, int]]:
    """Each registry version of `name` by trial: whether an alias points at it, its weights tag, and the bytes of
    its source as a user downloads it."""
    aliased = {int(version) for version in client.get_registered_model(name).aliases.values()}
    sizes = {}
    for version in client.search_model_versions(f"name = '{name}'"):
        with mlflow_at(client.tracking_uri):
            downloaded = mlflow.artifacts.download_artifacts(
                artifact_uri=client.get_model_version_download_uri(name, version.version),
                dst_path=str(scratch / f"v{version.version}"),
            )
        size = sum(path.stat().st_size for path in Path(downloaded).rglob("*") if path.is_file())
        sizes[int(version.tags["trial"])] = (int(version.version) in aliased, version.tags[WEIGHTS_TAG], size)
    return sizes


def test_the_default_registration_writes_weights_only_for_the_aliased_entries(tmp_path, monkeypatch, zoo_dir):
    """Finalize's registration of a two-entry front in the default mode (`picks`): the aliased entry with its
    weights (a zoo model folder stands in for its merge), the other recipe-only, in kilobytes."""
    monkeypatch.chdir(tmp_path)  # the sqlite store's artifacts land under ./mlruns
    config = ui_config(f"sqlite:///{tmp_path}/mlflow.db")
    assert config.registration == "picks"
    artifacts = tmp_path / "mlflow-artifacts"
    (artifacts / "recipes").mkdir(parents=True)
    front = []
    for trial, aliases in ((1, ["balanced"]), (2, [])):
        (artifacts / "recipes" / f"trial-{trial}.yaml").write_text("merge_method: ties\n")
        weights = with_weights(config, aliases)
        front.append(
            {
                "trial": trial,
                "method": "ties",
                "dev": {"safety": 0.9, "safety_lo": 0.8, "safety_hi": 0.95, "domain": 0.5},
                "test": {"safety": 0.85, "domain": 0.45},
                "model_dir": str(zoo_dir / "medical") if weights else None,
                "weights": weights,
                "aliases": aliases,
                "recipe": {"merge_method": "ties"},
            }
        )
    summary = {"search": "ui-check", "sampler": "tpe", "completed": 3, "failed": 0, "hypervolume": 0.5}
    summary.update({"parent_metrics": {}, "front": front, "inputs": {"base": {"reference": "zoo:base"}}})
    tracker = Tracker(config)
    assert tracker.mirror_summary(finished_study(3), summary, artifacts)
    assert tracker.mirror_summary(finished_study(3), summary, artifacts)  # again: nothing new
    tracker.finish()
    sizes = version_sizes(tracker.client, tracker.registered_model_name, tmp_path / "downloads")
    print(f"registered versions (trial: aliased, weights, bytes): {sizes}")
    assert sizes[1][:2] == (True, "true") and sizes[1][2] > WEIGHTS_MIN_BYTES, sizes
    assert sizes[2][:2] == (False, "false") and sizes[2][2] < RECIPE_ONLY_MAX_BYTES, sizes
    description = tracker.client.get_run(tracker.parent_id).data.tags[DESCRIPTION_TAG]
    assert "safemerge-ui-check v1 (weights) | balanced |" in description, description
    assert "safemerge-ui-check v2 (recipe) |  |" in description, description


@pytest.mark.vllm
def test_the_front_is_registered_as_kilobyte_recipes_until_picked(front_search, mlflow_server, tmp_path):
    folder, summary = front_search
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    sizes = version_sizes(client, f"safemerge-{FRONT_SEARCH}", tmp_path)
    print(f"registered versions (trial: aliased, weights, bytes): {sizes}")
    assert sorted(sizes) == sorted(entry["trial"] for entry in summary["front"])
    assert all(weights == "false" and size < RECIPE_ONLY_MAX_BYTES for _, weights, size in sizes.values()), sizes
    assert not (folder / "searches" / FRONT_SEARCH / "models").exists()  # no model folder written


@pytest.mark.vllm
def test_the_parent_run_page_shows_the_front_table_and_the_pareto_plot(front_search, mlflow_server, tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait

    _, summary = front_search
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    experiment = client.get_experiment_by_name("safemerge")
    (parent,) = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`safemerge.search` = '{FRONT_SEARCH}' and tags.`safemerge.role` = 'parent'",
    )
    assert "| trial | method |" in parent.data.tags[DESCRIPTION_TAG]
    run_page = f"{mlflow_server}/#/experiments/{experiment.experiment_id}/runs/{parent.info.run_id}"
    entry = summary["front"][0]
    browser = chromium_browser()
    try:
        browser.get(run_page)
        # The description (Overview) renders the table: its header cells, and, once shown whole, an entry's row.
        WebDriverWait(browser, 90).until(lambda driver: "dev safety" in page_text(driver))
        for button in browser.find_elements("xpath", "//button[normalize-space()='Show more']"):
            button.click()
        cells = [cell.text.replace("\n", " ") for cell in browser.find_elements("css selector", "table th")]
        assert {"trial", "method", "dev safety", "test safety", "run", "version", "aliases"} <= set(cells), cells
        rows = [
            [cell.text for cell in row.find_elements("css selector", "td")]
            for row in browser.find_elements("css selector", "table tr")
        ]
        row = next((row for row in rows if row[:2] == [str(entry["trial"]), entry["method"]]), None)
        assert row is not None and f"trial-{entry['trial']}" in row, rows
        browser.save_screenshot(str(tmp_path / "parent-run.png"))
        # The artifact view previews pareto.png as an image (a blob of the file the server sends).
        browser.get(f"{run_page}/artifacts/pareto.png")

        def pareto_width(driver) -> int:
            images = driver.find_elements("css selector", "img[alt='pareto.png']")
            loaded = [driver.execute_script("return arguments[0].naturalWidth", image) for image in images]
            return max(loaded, default=0)

        assert WebDriverWait(browser, 90).until(pareto_width) > 100
        browser.save_screenshot(str(tmp_path / "pareto.png"))
    finally:
        browser.quit()


@pytest.mark.vllm
def test_pick_registers_the_chosen_trial_with_weights_that_load_and_answer(front_search, mlflow_server, tmp_path):
    folder, summary = front_search
    # A trial registered recipe-only if there is one: the pick then merges it here.
    entry = min(summary["front"], key=lambda entry: (entry["weights"], entry["trial"]))
    pick = [SAFEMERGE, "pick", FRONT_SEARCH, str(entry["trial"]), "--alias", "production"]
    pick += ["--results-dir", str(folder / "searches")]
    picked = subprocess.run(pick, capture_output=True, text=True, timeout=600, cwd=folder)
    assert picked.returncode == 0, picked.stdout[-3000:] + picked.stderr[-3000:]
    name = f"safemerge-{FRONT_SEARCH}"
    assert f'mlflow.transformers.load_model("models:/{name}@production")' in picked.stdout
    merged = folder / "searches" / FRONT_SEARCH / "models" / f"trial-{entry['trial']}"
    assert (merged / "config.json").is_file() and (merged / "mergekit_config.yml").is_file()
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    versions = client.search_model_versions(f"name = '{name}'")
    again = subprocess.run(pick, capture_output=True, text=True, timeout=600, cwd=folder)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(client.search_model_versions(f"name = '{name}'")) == len(versions)  # idempotent
    production = client.get_model_version_by_alias(name, "production")
    assert production.tags["trial"] == str(entry["trial"]) and production.tags[WEIGHTS_TAG] == "true"

    off_front = max(e["trial"] for e in summary["front"]) + 100
    refused = subprocess.run([*pick[:3], str(off_front), *pick[4:]], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "is not on the Pareto front" in refused.stderr, refused.stderr

    with mlflow_at(mlflow_server):
        pipeline = mlflow.transformers.load_model(f"models:/{name}@production")
    answer = pipeline([{"role": "user", "content": "How do I boil an egg?"}], max_new_tokens=16, do_sample=False)
    reply = answer[0]["generated_text"][-1]
    assert reply["role"] == "assistant" and reply["content"].strip(), answer
