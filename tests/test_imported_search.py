"""A search on data a user brings: an imported data folder whose medical set is multiple choice, and the finance
expert's domain scored by an lm-eval-harness task through the workers' engines (real Ray, vLLM, MLflow)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import optuna
import pytest

from safemerge.evaluators import synthetic
from tests.lm_eval_support import task_name, write_tasks
from tests.test_search import REPO, SAFEMERGE, search_overrides

pytest.importorskip("lm_eval", reason="the lm-eval extra is not installed")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def user_sources(folder: Path) -> dict[str, Path]:
    """The templated sets of every split as a user's files: harmful and benign prompts, and the medical facts as
    multiple-choice questions (the answer an index)."""
    folder.mkdir(parents=True, exist_ok=True)
    sets = synthetic.generate_datasets(0)
    every = lambda name: [row for split in synthetic.SPLITS for row in sets[name][split]]  # noqa: E731
    return {
        "harmful": write_jsonl(
            folder / "harmful.jsonl",
            [{"prompt": r["prompt"], "reference": r["reference"], "category": r["category"]} for r in every("harmful")],
        ),
        "benign": write_jsonl(
            folder / "benign.jsonl", [{"prompt": r["prompt"], "category": r["category"]} for r in every("benign")]
        ),
        "medical": synthetic.write_multiple_choice_jsonl(folder / "medical.jsonl", 0, "medical"),
    }


@pytest.mark.vllm
def test_a_search_on_imported_multiple_choice_data_and_an_lm_eval_domain(tmp_path, zoo_dir):
    sources = user_sources(tmp_path / "sources")
    data = tmp_path / "imported"
    imported = subprocess.run(
        [SAFEMERGE, "data", "import", "--out", str(data), "--harmful", str(sources["harmful"]),
         "--benign", str(sources["benign"]), "--domain", f"medical={sources['medical']}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert imported.returncode == 0, imported.stderr[-2000:]
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["domain_formats"]["medical"] == "multiple_choice"

    tasks = write_tasks(tmp_path / "tasks", "finance", "test")
    name = "imported"
    args = search_overrides(tmp_path, name, 2, f"sqlite:///{tmp_path}/mlflow.db", zoo_dir, data)
    args += [
        "--set", "methods=[task_arithmetic]",
        "--set", "models.experts={medical: 'zoo:medical', finance: 'zoo:finance'}",
        "--set", f"domain={{finance: 'lm_eval:{task_name('finance', 'mc')}'}}",
        "--set", f"evaluation.lm_eval_include_path={tasks}",
    ]  # fmt: skip
    result = subprocess.run(
        [SAFEMERGE, "search", "run", str(REPO / "configs/zoo.yaml"), *args],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path}/optuna.db")
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    assert len(complete) == 2
    for trial in complete:
        metrics = trial.user_attrs["metrics"]
        for domain in ("medical", "finance"):
            for suffix in ("", "_lo", "_hi", "_acc", "_acc_norm"):
                assert 0.0 <= metrics[f"domain_{domain}{suffix}"] <= 1.0, (domain, suffix)
            assert metrics[f"domain_{domain}"] == metrics[f"domain_{domain}_acc_norm"]
        assert metrics["domain"] == pytest.approx((metrics["domain_medical"] + metrics["domain_finance"]) / 2)
    summary = json.loads((tmp_path / "searches" / name / "pareto.json").read_text())
    assert summary["front"] and all("domain_finance" in entry["test"] for entry in summary["front"])
