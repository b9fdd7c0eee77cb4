"""`safemerge data import`: users' JSONL, JSON, CSV and Parquet files, `datasets` folders and hub datasets become a
data folder the evaluators read; bad rows are dropped, counted and named; splits are stratified and reproducible."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pytest

from safemerge.cli import main
from safemerge.errors import UserError
from safemerge.evaluators import imports, synthetic
from safemerge.evaluators.objectives import load_eval_set

CATEGORIES = ("weapons", "fraud", "hacking")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow
    import pyarrow.parquet

    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    return path


def folder_bytes(folder: Path) -> dict[str, str]:
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture
def sources(tmp_path: Path) -> dict[str, Path]:
    """One source per column form, each with good rows and a few bad ones."""
    from datasets import Dataset, DatasetDict

    folder = tmp_path / "sources"
    folder.mkdir()
    harmful = [{"prompt": f"How do I commit {c} act number {i}?", "category": c} for c in CATEGORIES for i in range(4)]
    harmful += [
        "{not json",  # malformed
        {"prompt": "   ", "category": "fraud"},  # empty
        {"prompt": "How do I  commit weapons act number 0? ", "category": "weapons"},  # duplicate (whitespace)
        {"prompt": "x" * (imports.MAX_CHARS + 1), "category": "fraud"},  # over-long
    ]
    benign = [{"prompt": f"How do I kill Python process {i}?", "category": "homonym"} for i in range(6)]
    open_rows = [
        {
            "question_text": f"Which organ does drug {i} act on?",
            "gold": f"organ {i}",
            "relation": ["site", "dose"][i % 2],
        }
        for i in range(8)
    ] + [{"question_text": "Which organ does drug 9 act on?", "gold": ""}]  # empty answer
    mc_list = [
        {"question": f"Dose of drug {i}?", "choices": ["1 mg", "2 mg", "3 mg"], "answer": i % 3, "relation": "dose"}
        for i in range(6)
    ] + [
        {"question": "Dose of drug 7?", "choices": ["1 mg", "2 mg"], "answer": 5},  # index out of range: malformed
        {"question": "Dose of drug 8?", "choices": ["1 mg"], "answer": 0},  # one choice: malformed
    ]
    mc_json = [[f"Rate of fund {i}?", json.dumps(["1%", "2%", "3%", "4%"]), "ABCD"[i % 4], "rates"] for i in range(6)]
    mc_json += [["Rate of fund 7?", json.dumps(["1%", "2%", "3%", "4%"]), "E", "rates"]]  # no choice E: malformed
    mc_json += [["Rate of fund 8?", "1%, 2%", "A", "rates"]]  # a choices cell that is not a JSON list: malformed
    medmcqa = [[f"Nerve of muscle {i}?", "ulnar", "radial", "median", "axillary", i % 4] for i in range(6)]
    medmcqa += [["Nerve of muscle 9?", "ulnar", "radial", "median", "axillary", "seven"]]  # not an index: malformed
    saved = DatasetDict(
        {
            "train": Dataset.from_list([{"prompt": f"Tax rule {i}?", "answer": f"rule {i}"} for i in range(4)]),
            "validation": Dataset.from_list([{"prompt": f"Tax rule {i}?", "answer": f"rule {i}"} for i in (4, 5, 6)]),
        }
    )
    saved.save_to_disk(str(folder / "saved"))
    return {
        "harmful": write_jsonl(folder / "harmful.jsonl", harmful),
        "benign": write_parquet(folder / "benign.parquet", benign),
        "open": write_jsonl(folder / "open.jsonl", open_rows),
        "mc_list": write_parquet(folder / "mc.parquet", mc_list),
        "mc_json": write_csv(folder / "mc.csv", ["question", "choices", "answer", "relation"], mc_json),
        "medmcqa": write_csv(folder / "medmcqa.csv", ["text", "opa", "opb", "opc", "opd", "cop"], medmcqa),
        "saved": folder / "saved",
    }


def import_argv(sources: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "data",
        "import",
        "--out",
        str(out),
        "--harmful",
        str(sources["harmful"]),
        "--benign",
        str(sources["benign"]),
        "--domain",
        f"pharma={sources['open']}",
        "--domain",
        f"dosing={sources['mc_list']}",
        "--domain",
        f"funds={sources['mc_json']}",
        "--domain",
        f"medmcqa={sources['medmcqa']}",
        "--domain",
        f"tax={sources['saved']}",
        "--columns",
        "pharma:prompt=question_text",
        "--columns",
        "pharma:answer=gold",
        "--columns",
        "medmcqa:question=text",
        "--columns",
        "medmcqa:choices=opa,opb,opc,opd",
        "--columns",
        "medmcqa:answer=cop",
        "--split",
        "0.5,0.25,0.25",
        *extra,
    ]


def all_rows(out: Path, name: str) -> list[dict]:
    sets, _ = synthetic.load_datasets(out)
    return [row for split in synthetic.SPLITS for row in sets[name][split].to_list()]


def test_every_source_form_is_imported_with_bad_rows_counted_and_named(sources, tmp_path, capsys):
    out = tmp_path / "data"
    assert main(import_argv(sources, out)) == 0
    printed = capsys.readouterr().out
    assert "harmful" in printed and "1 empty, 1 duplicate, 1 over-long, 1 malformed" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["generator"] == "import" and manifest["seed"] == 0
    assert manifest["split"] == {"train": 0.5, "dev": 0.25, "test": 0.25}
    assert manifest["domains"] == ["pharma", "dosing", "funds", "medmcqa", "tax"]
    assert manifest["domain_formats"] == {
        "pharma": "open",
        "dosing": "multiple_choice",
        "funds": "multiple_choice",
        "medmcqa": "multiple_choice",
        "tax": "open",
    }
    kept = {"harmful": 12, "benign": 6, "pharma": 8, "dosing": 6, "funds": 6, "medmcqa": 6, "tax": 7}
    for name, count in kept.items():
        assert manifest["sets"][name]["kept"] == count
        assert sum(manifest["counts"][name].values()) == count
        assert len(all_rows(out, name)) == count

    # Bad rows: each reason counted, with its first example and what was wrong.
    dropped = manifest["sets"]["harmful"]["dropped"]
    assert {reason: entry["count"] for reason, entry in dropped.items()} == dict.fromkeys(imports.DROP_REASONS, 1)
    assert dropped["malformed"]["first"]["row"] == 13 and dropped["malformed"]["first"]["example"] == "{not json"
    assert dropped["empty"]["first"]["example"] == {"prompt": "   ", "category": "fraud"}
    assert dropped["duplicate"]["first"]["why"] == "same as row 1"
    assert dropped["over-long"]["first"]["row"] == 16 and "4097 characters" in dropped["over-long"]["first"]["why"]
    assert len(dropped["over-long"]["first"]["example"]["prompt"]) < 300  # the manifest keeps a cut example
    assert manifest["sets"]["pharma"]["dropped"]["empty"]["first"]["why"] == "answer (column 'gold') is empty"
    assert manifest["sets"]["dosing"]["dropped"]["malformed"]["count"] == 2
    assert "outside 0..1" in manifest["sets"]["dosing"]["dropped"]["malformed"]["first"]["why"]
    funds_bad = manifest["sets"]["funds"]["dropped"]["malformed"]
    assert funds_bad["count"] == 2 and funds_bad["first"]["why"] == "answer 'E' names no choice of 4"
    assert manifest["sets"]["medmcqa"]["dropped"]["malformed"]["first"]["example"]["cop"] == "seven"
    assert manifest["sets"]["tax"]["dropped"] == {}

    # Provenance and the column mapping used.
    harmful_source = manifest["sets"]["harmful"]["source"]
    assert harmful_source["sha256"] == hashlib.sha256(sources["harmful"].read_bytes()).hexdigest()
    assert harmful_source["kind"] == "jsonl" and harmful_source["path"] == str(sources["harmful"].resolve())
    assert manifest["sets"]["tax"]["source"]["kind"] == "datasets folder"
    assert len(manifest["sets"]["tax"]["source"]["sha256"]) == 64
    assert manifest["sets"]["medmcqa"]["columns"] == {
        "question": "text",
        "choices": ["opa", "opb", "opc", "opd"],
        "answer": "cop",
    }
    assert manifest["sets"]["pharma"]["columns"] == {
        "prompt": "question_text",
        "answer": "gold",
        "relation": "relation",
    }
    assert manifest["sets"]["harmful"]["default_reference"] == {"rows": 12, "text": imports.FIXED_REFUSAL}

    # The rows, in the evaluators' columns.
    harmful = all_rows(out, "harmful")
    assert {row["reference"] for row in harmful} == {imports.FIXED_REFUSAL}
    assert {row["category"] for row in harmful} == set(CATEGORIES)
    assert set(all_rows(out, "benign")[0]) == {"prompt", "category"}
    pharma = {row["prompt"]: row for row in all_rows(out, "pharma")}
    assert pharma["Which organ does drug 3 act on?"] == {
        "prompt": "Which organ does drug 3 act on?",
        "answer": "organ 3",
        "reference": "organ 3",
        "relation": "dose",
    }
    funds = {row["prompt"]: row for row in all_rows(out, "funds")}
    assert funds["Rate of fund 2?"] == {
        "prompt": "Rate of fund 2?",
        "choices": ["1%", "2%", "3%", "4%"],
        "label": 2,
        "answer": "3%",
        "reference": "3%",
        "relation": "rates",
    }
    dosing = {row["prompt"]: row for row in all_rows(out, "dosing")}
    assert (dosing["Dose of drug 4?"]["label"], dosing["Dose of drug 4?"]["answer"]) == (1, "2 mg")
    medmcqa = {row["prompt"]: row for row in all_rows(out, "medmcqa")}
    assert medmcqa["Nerve of muscle 3?"]["choices"] == ["ulnar", "radial", "median", "axillary"]
    assert (medmcqa["Nerve of muscle 3?"]["label"], medmcqa["Nerve of muscle 3?"]["relation"]) == (3, "")
    assert sorted(row["prompt"] for row in all_rows(out, "tax")) == [f"Tax rule {i}?" for i in range(7)]

    # The evaluators read it like generated data; the generator's reuse leaves it as it is.
    eval_set = load_eval_set(out, "dev", domains=manifest["domains"])
    sets, _ = synthetic.load_datasets(out)
    assert eval_set.harmful_prompts == sets["harmful"]["dev"]["prompt"]
    assert eval_set.domains["pharma"].answers == sets["pharma"]["dev"]["answer"]
    assert eval_set.domains["funds"].answers == [row["choices"][row["label"]] for row in sets["funds"]["dev"]]
    before, lines = folder_bytes(out), []
    assert synthetic.ensure_datasets(out, seed=0, log=lines.append)["generator"] == "import"
    assert "written by 'import': used as it is" in lines[0]
    assert folder_bytes(out) == before


def test_splits_are_stratified_disjoint_and_reproducible(sources, tmp_path):
    first, again, other = tmp_path / "first", tmp_path / "again", tmp_path / "other"
    for out, seed in ((first, "0"), (again, "0"), (other, "1")):
        assert main(import_argv(sources, out, "--seed", seed)) == 0
    assert folder_bytes(first) == folder_bytes(again)  # byte for byte
    assert folder_bytes(first) != folder_bytes(other)
    sets, manifest = synthetic.load_datasets(first)
    assert manifest["counts"]["harmful"] == {"train": 6, "dev": 3, "test": 3}
    for split in synthetic.SPLITS:  # 4 rows per category, split 0.5/0.25/0.25: 2/1/1 of each
        categories = sets["harmful"][split]["category"]
        assert sorted(categories) == sorted(CATEGORIES * (2 if split == "train" else 1))
    for name in manifest["counts"]:
        prompts = [set(sets[name][split]["prompt"]) for split in synthetic.SPLITS]
        assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])
    other_sets, _ = synthetic.load_datasets(other)
    assert other_sets["harmful"]["test"]["prompt"] != sets["harmful"]["test"]["prompt"]


def test_a_second_import_without_force_is_refused_and_leaves_the_first_intact(sources, tmp_path, capsys):
    out = tmp_path / "data"
    assert main(import_argv(sources, out)) == 0
    before = folder_bytes(out)
    capsys.readouterr()
    assert main(import_argv(sources, out, "--seed", "3")) == 2
    err = capsys.readouterr().err
    assert err.startswith("safemerge: error: --out") and "pass --force to replace it" in err
    assert len(err.strip().splitlines()) == 1
    assert folder_bytes(out) == before
    assert main(import_argv(sources, out, "--seed", "3", "--force")) == 0
    assert json.loads((out / "manifest.json").read_text())["seed"] == 3
    assert sorted(path.name for path in tmp_path.iterdir()) == ["data", "sources"]  # no staging folder left


def test_json_files_and_csv_harmful_sets_with_references_are_read(tmp_path):
    rows = [{"prompt": f"Tax rule {i}?", "answer": i * 10, "reference": f"Rule {i} is {i * 10}."} for i in range(5)]
    (tmp_path / "tax.json").write_text(json.dumps({"data": rows}))
    (tmp_path / "columns.json").write_text(json.dumps({"prompt": ["a?", "b?", "c?"], "answer": ["x", "y", "z"]}))
    harmful = write_csv(
        tmp_path / "harmful.csv",
        ["goal", "refusal"],
        [[f"Build weapon {i}", "No." if i else ""] for i in range(3)] + [["Build\nweapon 3", "No."]],
    )
    with open(tmp_path / "lines.jsonl", "w") as handle:  # a raw U+2028 inside a text is not a line break
        handle.writelines(
            json.dumps({"prompt": f"q{i}\u2028?", "answer": "a"}, ensure_ascii=False) + "\n" for i in range(3)
        )
    manifest = imports.import_datasets(
        imports.ImportRequest(
            out=tmp_path / "data",
            harmful=str(harmful),
            domains={
                "tax": str(tmp_path / "tax.json"),
                "letters": str(tmp_path / "columns.json"),
                "lines": str(tmp_path / "lines.jsonl"),
            },
            columns=["harmful:prompt=goal", "harmful:reference=refusal"],
            split=(0.34, 0.33, 0.33),
        )
    )
    assert manifest["domain_formats"] == {"tax": "open", "letters": "open", "lines": "open"}
    assert sorted(row["prompt"] for row in all_rows(tmp_path / "data", "lines")) == [f"q{i}\u2028?" for i in range(3)]
    assert manifest["sets"]["benign"]["source"]["kind"] == "templated"  # no --benign: the templated look-alikes
    assert sorted(row["answer"] for row in all_rows(tmp_path / "data", "tax")) == ["0", "10", "20", "30", "40"]
    references = {row["prompt"]: row["reference"] for row in all_rows(tmp_path / "data", "harmful")}
    assert references == {
        "Build weapon 0": imports.FIXED_REFUSAL,
        "Build weapon 1": "No.",
        "Build weapon 2": "No.",
        "Build\nweapon 3": "No.",
    }
    assert manifest["sets"]["harmful"]["default_reference"]["rows"] == 1
    load_eval_set(tmp_path / "data", "test", domains=["tax", "letters"])


def run_refused(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


@pytest.mark.parametrize(
    "change, fragments",
    [
        ({"--harmful": "missing.jsonl"}, ["--harmful 'missing.jsonl': no such file or folder"]),
        ({"--harmful": "notes.txt"}, ["--harmful", "unknown extension '.txt'", ".jsonl, .json, .csv, .parquet"]),
        (
            {"--domain": "medqa=mc_renamed.csv"},
            [
                "set 'medqa' (multiple choice) needs a column 'question'",
                "its columns are ['stem', 'choices', 'answer']",
                "--columns medqa:question=COLUMN",
            ],
        ),
        (
            {"--domain": "medqa=mc_renamed.csv", "--columns": "medqa:question=body"},
            ["--columns medqa:question=body", "has no column 'body'", "['stem', 'choices', 'answer']"],
        ),
        ({"--columns": "other:prompt=x"}, ["names set 'other', which is not imported"]),
        ({"--columns": "medqa:label=x"}, ["set 'medqa' has no field 'label'"]),
        ({"--domain": "medqa=tiny.jsonl"}, ["set 'medqa' has 2 usable rows", "too few", "--split"]),
        ({"--domain": "harmful=tiny.jsonl"}, ["the name 'harmful' is taken"]),
        ({"--domain": "medqa=blank.jsonl"}, ["set 'medqa' has no readable row"]),
        ({"--domain": "hf:org"}, ["--domain 'hf:org' must look like NAME=SRC"]),
        (
            {"--domain": "medqa=hf:org/name:"},
            ["is not a Hugging Face dataset reference", "hf:ORG/NAME[:CONFIG][@SPLIT]"],
        ),
        ({"--split": "0.5,0.5"}, ["--split", "three fractions above 0 that sum to 1"]),
        ({"--split": "0.8,0.2,0"}, ["--split", "three fractions"]),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(change, fragments, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "harmful.jsonl", [{"prompt": f"bad {i}"} for i in range(6)])
    write_jsonl(tmp_path / "tiny.jsonl", [{"prompt": "q1", "answer": "a"}, {"prompt": "q2", "answer": "b"}])
    write_jsonl(tmp_path / "open.jsonl", [{"prompt": f"q{i}", "answer": "a"} for i in range(6)])
    write_csv(tmp_path / "mc_renamed.csv", ["stem", "choices", "answer"], [["q", '["a", "b"]', "A"]])
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "blank.jsonl").write_text("\n[1, 2]\n")
    options = {"--harmful": "harmful.jsonl", "--domain": "medqa=open.jsonl", **change}
    argv = ["data", "import", "--out", "out"] + [item for pair in options.items() for item in pair]
    if argv.count("--split") == 1:
        with pytest.raises(SystemExit) as exit_info:  # a usage error: argparse's one line
            main(argv)
        assert exit_info.value.code == 2
        line = capsys.readouterr().err.strip()
    else:
        line = run_refused(argv, capsys)
    for fragment in fragments:
        assert fragment in line, line
    assert not (tmp_path / "out").exists()


def test_hub_references_are_parsed_and_a_failed_load_is_one_line(tmp_path, monkeypatch, capsys):
    import datasets
    import huggingface_hub.constants

    spec = imports.parse_source("hf:openlifescienceai/medmcqa:default@validation[:100]", "--domain medmcqa")
    assert (spec.hub_name, spec.hub_config, spec.hub_split) == (
        "openlifescienceai/medmcqa",
        "default",
        "validation[:100]",
    )
    assert imports.parse_source("hf:cais/mmlu", "--domain mmlu").hub_config is None
    with pytest.raises(UserError, match="is not a Hugging Face dataset reference"):
        imports.parse_source("hf:", "--harmful")
    # No hub here: offline mode makes `datasets` fail at once, as it would on a cluster without internet.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "open.jsonl", [{"prompt": f"q{i}", "answer": "a"} for i in range(6)])
    line = run_refused(
        ["data", "import", "--out", "out", "--harmful", "hf:nobody/no-such-set@train", "--domain", "d=open.jsonl"],
        capsys,
    )
    assert line.startswith("safemerge: error: --harmful hf:nobody/no-such-set@train could not be loaded with")
    assert "check the name, config and split" in line
    assert not (tmp_path / "out").exists()


def test_a_hub_reference_that_names_a_local_folder_loads_through_datasets(tmp_path, monkeypatch):
    """`datasets.load_dataset` reads a local folder of data files by the same name before asking the hub: the
    hub code path, run here without a hub."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "acme" / "harm").mkdir(parents=True)
    write_jsonl(tmp_path / "acme" / "harm" / "train.jsonl", [{"prompt": f"bad {i}"} for i in range(5)])
    write_jsonl(tmp_path / "acme" / "harm" / "test.jsonl", [{"prompt": f"worse {i}"} for i in range(4)])
    write_jsonl(tmp_path / "open.jsonl", [{"prompt": f"q{i}", "answer": "a"} for i in range(6)])
    request = imports.ImportRequest(
        out=tmp_path / "out", harmful="hf:acme/harm@train", domains={"d": "open.jsonl"}, benign="hf:acme/harm"
    )
    manifest = imports.import_datasets(request)
    assert manifest["sets"]["harmful"]["kept"] == 5  # the train split only
    assert manifest["sets"]["benign"]["kept"] == 9  # every split, one after another
    source = manifest["sets"]["harmful"]["source"]
    assert (source["kind"], source["name"], source["split"]) == ("hub", "acme/harm", "train")
    assert source["path"] == str((tmp_path / "acme" / "harm").resolve()) and len(source["sha256"]) == 64
