"""A person opens the MLflow UI in a browser and sees the search's runs listed (headless Chromium)."""

from __future__ import annotations

import shutil

import optuna
import pytest

from safemerge.search.tracking import Tracker
from tests.test_search import zoo_config


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


def test_mlflow_ui_lists_the_search_runs(mlflow_server):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or chromedriver is None:
        pytest.fail("Debian's chromium and chromium-driver are needed: scripts/test.sh installs them as root")
    trials = 3
    tracker = tracked_search(mlflow_server, trials)
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
        "--window-size=1400,900",
    ):
        options.add_argument(argument)
    browser = webdriver.Chrome(service=Service(chromedriver), options=options)
    try:
        browser.get(f"{mlflow_server}/#/experiments/{tracker.experiment_id}/runs")
        expected = f"{trials + 1} matching runs"  # the parent and one child per trial

        def page_text(driver) -> str:
            return driver.find_element("tag name", "body").text

        # The count renders before the grid's rows: wait for both, the parent run listed by the search's name.
        WebDriverWait(browser, 90).until(
            lambda driver: expected in page_text(driver) and "ui-check" in page_text(driver)
        )
    finally:
        browser.quit()
