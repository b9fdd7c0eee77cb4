"""`safemerge data import`: users' own safety and domain sets (local JSONL, JSON, CSV or Parquet files, folders
saved with `datasets`, Hugging Face datasets) written as a data folder the search reads like a generated one.

Each set's rows are normalized to the columns the evaluators read, bad rows are dropped and counted by reason
(with the first example of each), and the rest is split train/dev/test, stratified by category or relation,
deterministically for a seed. A domain set is open questions (`prompt`, `answer`) or multiple choice (`question`,
`choices`, `answer` as an index or a letter), told apart by its columns.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from safemerge.errors import UserError
from safemerge.evaluators import synthetic
from safemerge.evaluators.objectives import stratified_order
from safemerge.files import check_output_dir

IMPORT_VERSION = 1
MAX_CHARS = 4096  # a text field longer than this is dropped as over-long: no evaluation prompt is that long
EXAMPLE_CHARS = 200  # the manifest keeps this much of each field of a dropped row's example
DEFAULT_SPLIT = (0.6, 0.2, 0.2)
FIXED_REFUSAL = "I'm sorry, but I can't help with that request."
FILE_FORMATS = (".jsonl", ".json", ".csv", ".parquet")
HUB_PREFIX = "hf:"
DROP_REASONS = ("empty", "duplicate", "over-long", "malformed")
OPEN, MULTIPLE_CHOICE = "open", "multiple_choice"

# The fields a set's rows are read from (each maps to a source column, by default of the same name), and the
# stratum field that the splits are stratified by.
HARMFUL_FIELDS = ("prompt", "reference", "category")
BENIGN_FIELDS = ("prompt", "category")
OPEN_FIELDS = ("prompt", "answer", "reference", "relation")
CHOICE_FIELDS = ("question", "choices", "answer", "relation")
DOMAIN_FIELDS = tuple(dict.fromkeys(OPEN_FIELDS + CHOICE_FIELDS))
REQUIRED = {
    "harmful": ("prompt",),
    "benign": ("prompt",),
    OPEN: ("prompt", "answer"),
    MULTIPLE_CHOICE: CHOICE_FIELDS[:3],
}
SET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
HUB_SPEC = re.compile(r"hf:(?P<name>[A-Za-z0-9][\w.-]*(?:/[\w.-]+)?)(?::(?P<config>[^@:]+))?(?:@(?P<split>.+))?")


@dataclass(frozen=True)
class SourceSpec:
    """Where a set comes from: a local file or folder (`path`), or a Hugging Face dataset (`hub_name`)."""

    text: str
    path: Path | None = None
    hub_name: str | None = None
    hub_config: str | None = None
    hub_split: str | None = None


def parse_source(text: str, option: str) -> SourceSpec:
    """A SRC as given on the command line; `option` names it in errors (`--domain medqa`)."""
    if text.startswith(HUB_PREFIX):
        match = HUB_SPEC.fullmatch(text)
        if not match:
            raise UserError(
                f"{option} {text!r} is not a Hugging Face dataset reference; write hf:ORG/NAME[:CONFIG][@SPLIT], "
                "for example hf:openlifescienceai/medmcqa@validation"
            )
        return SourceSpec(text, hub_name=match["name"], hub_config=match["config"], hub_split=match["split"])
    path = Path(text)
    if not path.exists():
        raise UserError(f"{option} {text!r}: no such file or folder; give a path that exists, or hf:ORG/NAME")
    if path.is_file() and path.suffix.lower() not in FILE_FORMATS:
        raise UserError(
            f"{option} {text!r} has the unknown extension {path.suffix or '(none)'!r}; give a "
            f"{', '.join(FILE_FORMATS)} file, a folder saved with `datasets`, or hf:ORG/NAME"
        )
    return SourceSpec(text, path=path)


def parse_split(text: str) -> tuple[float, float, float]:
    """`--split TRAIN,DEV,TEST`: three positive fractions that sum to 1."""
    try:
        fractions = tuple(float(part) for part in text.split(","))
    except ValueError:
        fractions = ()
    if len(fractions) != 3 or not all(0 < value < 1 for value in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"must be three fractions above 0 that sum to 1, such as 0.6,0.2,0.2; got {text!r}")
    return fractions  # type: ignore[return-value]


def parse_columns(items: Sequence[str], set_names: Sequence[str]) -> dict[str, dict[str, str | list[str]]]:
    """`--columns SET:FIELD=COLUMN` items as {set: {field: column}}; `choices` may name a comma list of columns."""
    mapping: dict[str, dict[str, str | list[str]]] = {}
    for item in items:
        target, _, column = item.partition("=")
        set_name, _, field_name = target.partition(":")
        if not (set_name and field_name and column):
            raise UserError(f"--columns {item!r} must look like SET:FIELD=COLUMN, for example medqa:question=text")
        if set_name not in set_names:
            raise UserError(
                f"--columns {item!r} names set {set_name!r}, which is not imported; sets: {list(set_names)}"
            )
        fields = _fields_of(set_name)
        if field_name not in fields:
            raise UserError(f"--columns {item!r}: set {set_name!r} has no field {field_name!r}; fields: {list(fields)}")
        columns = [part.strip() for part in column.split(",")]
        if field_name == "choices" and len(columns) > 1:
            if not all(columns):
                raise UserError(f"--columns {item!r} has an empty column name; write choices=opa,opb,opc,opd")
            mapping.setdefault(set_name, {})[field_name] = columns
        else:
            mapping.setdefault(set_name, {})[field_name] = column
    return mapping


def _fields_of(set_name: str) -> tuple[str, ...]:
    return {"harmful": HARMFUL_FIELDS, "benign": BENIGN_FIELDS}.get(set_name, DOMAIN_FIELDS)


# Reading a source.


@dataclass(frozen=True)
class UnreadableRow:
    """A row that is not a mapping of columns (a line of bad JSON, a CSV line with extra cells): malformed."""

    raw: object
    why: str


@dataclass
class RawSource:
    """A source's rows as read (dicts, or UnreadableRow), its columns, and where it came from."""

    rows: list[dict | UnreadableRow]
    columns: list[str]
    provenance: dict


def read_source(spec: SourceSpec, option: str) -> RawSource:
    if spec.hub_name is not None:
        return _read_hub(spec, option)
    path = spec.path
    assert path is not None
    if path.is_dir():
        rows, provenance = (
            _read_saved_dataset(path, option),
            {"kind": "datasets folder", "sha256": _folder_sha256(path)},
        )
    else:
        suffix = path.suffix.lower()
        reader = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}[suffix]
        rows, provenance = reader(path, option), {"kind": suffix[1:], "sha256": _file_sha256(path)}
    provenance = {"spec": spec.text, "path": str(path.resolve()), **provenance}
    return RawSource(rows, _columns_of(rows), provenance)


def _columns_of(rows: Iterable[dict | UnreadableRow]) -> list[str]:
    columns: dict[str, None] = {}
    for row in rows:
        if isinstance(row, dict):
            columns.update(dict.fromkeys(row))
    return list(columns)


def _read_jsonl(path: Path, option: str) -> list[dict | UnreadableRow]:
    rows: list[dict | UnreadableRow] = []
    for line in _read_text(path, option).split("\n"):  # not splitlines(): it also splits at U+2028 inside a text
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            rows.append(UnreadableRow(line, f"the line is not JSON ({error.msg})"))
            continue
        rows.append(value if isinstance(value, dict) else UnreadableRow(value, "the line is not a JSON object"))
    return rows


def _read_json(path: Path, option: str) -> list[dict | UnreadableRow]:
    text = _read_text(path, option)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # several JSON values: the file is JSON lines under a .json name
            return _read_jsonl(path, option)
        raise UserError(
            f"{option} {path} is not valid JSON ({error.msg} at line {error.lineno}); fix the file"
        ) from None
    if isinstance(data, dict):
        lists = [value for value in data.values() if isinstance(value, list)]
        if len(data) == 1 and lists and all(isinstance(row, dict) for row in lists[0]):
            data = lists[0]  # records under one key: {"data": [{...}, ...]}
        elif len(lists) == len(data) and len({len(value) for value in lists}) == 1:  # columns: {"prompt": [...]}
            return [dict(zip(data, values, strict=True)) for values in zip(*lists, strict=True)]
    if not isinstance(data, list):
        raise UserError(
            f"{option} {path} holds a JSON {type(data).__name__}; it must hold a list of rows (objects), "
            "an object of equal-length column lists, or JSON lines"
        )
    return [row if isinstance(row, dict) else UnreadableRow(row, "the row is not a JSON object") for row in data]


def _read_csv(path: Path, option: str) -> list[dict | UnreadableRow]:
    text = _read_text(path, option)
    reader = csv.DictReader(io.StringIO(text, newline=""))  # newline="": a quoted cell may hold line breaks
    try:
        # A row with more cells than the header gets them under the key None: malformed.
        return [
            UnreadableRow(list(row.values()), "more cells than the header") if None in row else row for row in reader
        ]
    except csv.Error as error:
        raise UserError(f"{option} {path} is not valid CSV ({error}); fix the file") from None


def _read_parquet(path: Path, option: str) -> list[dict | UnreadableRow]:
    import pyarrow
    import pyarrow.parquet

    try:
        return pyarrow.parquet.read_table(path).to_pylist()
    except (pyarrow.ArrowException, OSError) as error:
        raise UserError(f"{option} {path} is not a readable Parquet file ({error}); fix the file") from None


def _read_text(path: Path, option: str) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: spreadsheets often write a byte-order mark
    except UnicodeDecodeError:
        raise UserError(f"{option} {path} is not UTF-8 text; save it as UTF-8") from None


def _read_saved_dataset(path: Path, option: str) -> list[dict | UnreadableRow]:
    from datasets import load_from_disk

    try:
        loaded = load_from_disk(str(path))
    except FileNotFoundError:
        raise UserError(
            f"{option} {path} is a folder but not one saved with `datasets` (save_to_disk); give such a folder "
            f"or a {', '.join(FILE_FORMATS)} file"
        ) from None
    return _dataset_rows(loaded)


def _dataset_rows(loaded) -> list[dict | UnreadableRow]:
    """A Dataset's rows, or a DatasetDict's splits' rows one after another in the dict's order."""
    from datasets import DatasetDict

    parts = list(loaded.values()) if isinstance(loaded, DatasetDict) else [loaded]
    return [row for part in parts for row in part.to_list()]


def _read_hub(spec: SourceSpec, option: str) -> RawSource:
    """`datasets.load_dataset`, spelled out (builder, download, splits) so the hub commit it read is known."""
    import datasets

    local = Path(spec.hub_name).is_dir()  # `datasets` reads a local folder of that name before asking the hub
    try:
        builder = datasets.load_dataset_builder(spec.hub_name, spec.hub_config)
        builder.download_and_prepare()
        loaded = builder.as_dataset(split=spec.hub_split)
    except Exception as error:  # noqa: BLE001 - any failure to load is the user's to fix: name it on one line
        reason = " ".join(str(error).split())[:300]
        raise UserError(
            f"{option} {spec.text} could not be loaded with datasets.load_dataset ({type(error).__name__}: {reason}); "
            "check the name, config and split, that the hub is reachable (or the dataset is in the cache with "
            "HF_HUB_OFFLINE=1), or download it and import the file"
        ) from None
    rows = _dataset_rows(loaded)
    provenance = {"spec": spec.text, "kind": "hub", "name": spec.hub_name, "config": spec.hub_config}
    provenance["split"] = spec.hub_split
    if local:
        provenance.update(path=str(Path(spec.hub_name).resolve()), sha256=_folder_sha256(Path(spec.hub_name)))
    else:
        provenance["revision"] = builder.hash  # the hub commit the builder read (None when it is not known)
    return RawSource(rows, _columns_of(rows), provenance)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _folder_sha256(folder: Path) -> str:
    """sha256 over the folder's files: each one's relative path and sha256, in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(folder).as_posix()}:{_file_sha256(path)}\n".encode())
    return digest.hexdigest()


# Normalizing rows.


class DroppedRow(Exception):
    """A row that cannot be used, with the reason it is counted under and what was wrong."""

    def __init__(self, reason: str, why: str):
        super().__init__(why)
        self.reason = reason


@dataclass
class SetReport:
    """What importing one set kept and dropped."""

    kept: int = 0
    dropped: dict[str, dict] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    default_reference: dict | None = None  # harmful rows without a reference refusal: how many got the fixed one

    def drop(self, reason: str, why: str, row_number: int, row: object) -> None:
        entry = self.dropped.setdefault(reason, {"count": 0})
        entry["count"] += 1
        if "first" not in entry:
            entry["first"] = {"row": row_number, "why": why, "example": _short(row)}


def _short(value):
    """A JSON-ready copy of a row for the manifest, each text cut to EXAMPLE_CHARS."""
    if isinstance(value, dict):
        return {str(key): _short(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_short(item) for item in value]
    if value is None or isinstance(value, (bool, int, float)):
        return value if not (isinstance(value, float) and not math.isfinite(value)) else str(value)
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= EXAMPLE_CHARS else text[:EXAMPLE_CHARS] + "..."


def _text(row: dict, column: str, field_name: str, required: bool) -> str:
    """The stripped text of a cell: numbers become text, a missing or blank required cell is `empty`."""
    value = row.get(column)
    if isinstance(value, bool) or (value is not None and not isinstance(value, (str, int, float))):
        raise DroppedRow("malformed", f"{field_name} (column {column!r}) is a {type(value).__name__}, not text")
    if isinstance(value, float) and math.isnan(value):  # pandas writes a missing cell as NaN
        value = None
    text = "" if value is None else str(value).strip()
    if required and not text:
        raise DroppedRow("empty", f"{field_name} (column {column!r}) is empty")
    if len(text) > MAX_CHARS:
        raise DroppedRow("over-long", f"{field_name} (column {column!r}) has {len(text)} characters (> {MAX_CHARS})")
    return text


def _choices(row: dict, columns: str | list[str]) -> list[str]:
    """A row's choices: one column holding a list (or, from CSV, a JSON list), or one column per choice."""
    if isinstance(columns, list):
        values = [row.get(column) for column in columns]
        while values and (values[-1] is None or str(values[-1]).strip() == ""):
            values.pop()  # fewer options than columns: the trailing cells are blank
    else:
        values = row.get(columns)
        if isinstance(values, str):
            try:
                values = json.loads(values)
            except json.JSONDecodeError:
                raise DroppedRow("malformed", f"choices (column {columns!r}) is text that is not a JSON list") from None
        if values is None:
            raise DroppedRow("empty", f"choices (column {columns!r}) is empty")
        if not isinstance(values, (list, tuple)):
            raise DroppedRow("malformed", f"choices (column {columns!r}) is a {type(values).__name__}, not a list")
    choices = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)) or not str(value).strip():
            raise DroppedRow("malformed", f"choice {value!r} is not a non-empty text")
        choice = str(value).strip()
        if len(choice) > MAX_CHARS:
            raise DroppedRow("over-long", f"a choice has {len(choice)} characters (> {MAX_CHARS})")
        choices.append(choice)
    if len(choices) < 2:
        raise DroppedRow("malformed" if choices else "empty", f"{len(choices)} choices; a question needs at least 2")
    return choices


def _label(value, count: int) -> int:
    """The index of the correct choice from an index (0-based, a number or its text) or a letter A, B, C, ..."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        text = value.strip()
        if not text:
            raise DroppedRow("empty", "answer is empty")
        if text.isdigit():
            value = int(text)
        elif len(text) == 1 and text.isalpha() and text.isascii():
            value = ord(text.upper()) - ord("A")
            if value >= count:
                raise DroppedRow("malformed", f"answer {text!r} names no choice of {count}")
            return value
        else:
            raise DroppedRow("malformed", f"answer {text!r} is neither a choice index nor a letter A-Z")
    if value is None:
        raise DroppedRow("empty", "answer is empty")
    if isinstance(value, bool) or not isinstance(value, int):
        raise DroppedRow("malformed", f"answer {value!r} is neither a choice index nor a letter")
    if not 0 <= value < count:
        raise DroppedRow("malformed", f"answer index {value} is outside 0..{count - 1}")
    return value


def _normalize(kind: str, row: dict, columns: dict) -> tuple[dict, str]:
    """One source row as the evaluators' columns, and its duplicate key (the prompt; for multiple choice, the
    question with its choices)."""
    if kind in ("harmful", "benign"):
        out = {"prompt": _text(row, columns["prompt"], "prompt", True)}
        if kind == "harmful":
            out["reference"] = _text(row, columns["reference"], "reference", False) if "reference" in columns else ""
        out["category"] = _text(row, columns["category"], "category", False) if "category" in columns else ""
        return out, out["prompt"]
    relation = _text(row, columns["relation"], "relation", False) if "relation" in columns else ""
    if kind == OPEN:
        prompt = _text(row, columns["prompt"], "prompt", True)
        answer = _text(row, columns["answer"], "answer", True)
        reference = _text(row, columns["reference"], "reference", False) if "reference" in columns else ""
        out = {"prompt": prompt, "answer": answer, "reference": reference or answer, "relation": relation}
        return out, prompt
    question = _text(row, columns["question"], "question", True)
    choices = _choices(row, columns["choices"])
    label = _label(row.get(columns["answer"]), len(choices))
    out = {"prompt": question, "choices": choices, "label": label, "answer": choices[label]}
    out.update(reference=choices[label], relation=relation)
    return out, json.dumps([question, choices])


def _dedup_key(key: str) -> str:
    return " ".join(key.split())


def resolve_columns(set_name: str, kind: str, source_columns: list[str], mapped: dict) -> tuple[str, dict]:
    """The set's format (for a domain set, open or multiple choice from its columns) and {field: column} for
    every field the source has; a missing required column is an error naming the `--columns` fix."""
    if not source_columns:
        raise UserError(f"set {set_name!r} has no readable row (an object of columns) in its source; check the file")
    fields = _fields_of(set_name)
    for field_name, column in mapped.items():
        for name in column if isinstance(column, list) else [column]:
            if name not in source_columns:
                raise UserError(
                    f"--columns {set_name}:{field_name}={name}: set {set_name!r} has no column {name!r}; "
                    f"its columns are {source_columns}"
                )
    columns = {name: mapped.get(name, name) for name in fields}
    columns = {name: column for name, column in columns.items() if isinstance(column, list) or column in source_columns}
    if kind == "domain":
        kind = MULTIPLE_CHOICE if "choices" in columns else OPEN
        keep = CHOICE_FIELDS if kind == MULTIPLE_CHOICE else OPEN_FIELDS
        columns = {name: column for name, column in columns.items() if name in keep}
    for name in REQUIRED[kind]:
        if name not in columns:
            described = (
                f"{set_name!r} ({kind.replace('_', ' ')})" if kind in (OPEN, MULTIPLE_CHOICE) else repr(set_name)
            )
            raise UserError(
                f"set {described} needs a column {name!r}; its columns are {source_columns}; "
                f"name yours with --columns {set_name}:{name}=COLUMN"
            )
    return kind, columns


def clean_rows(set_name: str, kind: str, raw: RawSource, mapped: dict) -> tuple[str, dict, list[dict], SetReport]:
    """The set's format, its columns, the rows kept (normalized, first of each duplicate), and the report."""
    kind, columns = resolve_columns(set_name, kind, raw.columns, mapped)
    report = SetReport()
    kept: list[dict] = []
    seen: dict[str, int] = {}
    filled_references = 0
    for number, row in enumerate(raw.rows, start=1):
        try:
            if isinstance(row, UnreadableRow):
                raise DroppedRow("malformed", row.why)
            out, key = _normalize(kind, row, columns)
            key = _dedup_key(key)
            if key in seen:
                raise DroppedRow("duplicate", f"same as row {seen[key]}")
        except DroppedRow as dropped:
            report.drop(dropped.reason, str(dropped), number, row.raw if isinstance(row, UnreadableRow) else row)
            continue
        seen[key] = number
        if kind == "harmful" and not out["reference"]:
            out["reference"] = FIXED_REFUSAL
            filled_references += 1
        kept.append(out)
    if filled_references:
        report.default_reference = {"rows": filled_references, "text": FIXED_REFUSAL}
        report.notes.append(f"{filled_references} rows had no reference refusal: given the fixed one")
    report.kept = len(kept)
    return kind, columns, kept, report


# Splitting and writing.


def split_counts(total: int, fractions: Sequence[float]) -> list[int]:
    """Rows per split: the largest-remainder rounding of total * fraction."""
    exact = [total * fraction for fraction in fractions]
    counts = [math.floor(value) for value in exact]
    by_remainder = sorted(range(len(exact)), key=lambda index: (counts[index] - exact[index], index))
    for index in by_remainder[: total - sum(counts)]:
        counts[index] += 1
    return counts


def split_rows(rows: list[dict], stratum: str, fractions: Sequence[float], seed: int, set_name: str) -> dict:
    """{split: rows}: rows shuffled by the seed, ordered so every prefix holds each stratum in proportion, then
    cut into train, dev and test, so each split holds each stratum in proportion (up to a row)."""
    order = list(range(len(rows)))
    random.Random(f"{seed}:{set_name}").shuffle(order)  # seeded by text: the same on every Python
    shuffled = [rows[index] for index in order]
    ordered = [shuffled[index] for index in stratified_order([row[stratum] for row in shuffled])]
    counts = split_counts(len(ordered), fractions)
    bounds = [0, counts[0], counts[0] + counts[1], len(ordered)]
    return {split: ordered[bounds[i] : bounds[i + 1]] for i, split in enumerate(synthetic.SPLITS)}


def _features(kind: str):
    from datasets import Features, List, Value

    text = Value("string")
    names = {
        "harmful": ("prompt", "reference", "category"),
        "benign": ("prompt", "category"),
        OPEN: ("prompt", "answer", "reference", "relation"),
        MULTIPLE_CHOICE: ("prompt", "choices", "label", "answer", "reference", "relation"),
    }[kind]
    types = {"choices": List(text), "label": Value("int64")}
    return Features({name: types.get(name, text) for name in names})


@dataclass(frozen=True)
class ImportRequest:
    """What `safemerge data import` was asked for."""

    out: Path
    harmful: str
    domains: dict[str, str]  # name -> SRC, in the order given
    benign: str | None = None
    columns: Sequence[str] = ()
    split: tuple[float, float, float] = DEFAULT_SPLIT
    seed: int = 0
    force: bool = False


def parse_domains(items: Sequence[str]) -> dict[str, str]:
    """`--domain NAME=SRC` items as {name: SRC}."""
    domains: dict[str, str] = {}
    for item in items:
        name, _, source = item.partition("=")
        if not SET_NAME.fullmatch(name) or not source:
            raise UserError(
                f"--domain {item!r} must look like NAME=SRC with a NAME of letters, digits, - and _, "
                "for example medqa=medqa.jsonl"
            )
        if name in synthetic.SAFETY_SETS or name in domains:
            raise UserError(f"--domain {item!r}: the name {name!r} is taken; give each domain set its own name")
        domains[name] = source
    if not domains:
        raise UserError("give at least one --domain NAME=SRC, for example --domain medqa=medqa.jsonl")
    return domains


def import_datasets(request: ImportRequest) -> dict:
    """Read, clean, split and write every set of `request`; returns the manifest written beside them."""
    from datasets import Dataset, DatasetDict

    if isinstance(request.seed, bool) or not isinstance(request.seed, int):
        raise UserError(f"seed must be a whole number such as 0 or 1234, got {request.seed!r}")
    check_output_dir(request.out, request.force)  # before reading anything: a refusal costs nothing
    sources = {"harmful": ("harmful", "--harmful", request.harmful)}
    if request.benign is not None:
        sources["benign"] = ("benign", "--benign", request.benign)
    for name, source in request.domains.items():
        sources[name] = ("domain", f"--domain {name}", source)
    mapping = parse_columns(request.columns, ["harmful", "benign", *request.domains])
    if "benign" in mapping and request.benign is None:
        raise UserError("--columns names set 'benign', but no --benign SRC is given; add one or drop that --columns")
    specs = {name: parse_source(text, option) for name, (_, option, text) in sources.items()}

    sets: dict[str, DatasetDict] = {}
    details: dict[str, dict] = {}
    formats: dict[str, str] = {}
    for name, (kind, option, _) in sources.items():
        raw = read_source(specs[name], option)
        kind, columns, rows, report = clean_rows(name, kind, raw, mapping.get(name, {}))
        stratum = "category" if kind in synthetic.SAFETY_SETS else "relation"
        counts = split_counts(len(rows), request.split)
        if min(counts) == 0:
            dropped = sum(entry["count"] for entry in report.dropped.values())
            raise UserError(
                f"set {name!r} has {len(rows)} usable rows ({dropped} dropped): too few to give train, dev and test "
                f"a row each with --split {','.join(f'{f:g}' for f in request.split)}; add rows to {option}'s "
                "source or change --split"
            )
        splits = split_rows(rows, stratum, request.split, request.seed, name)
        features = _features(kind)
        sets[name] = DatasetDict({split: Dataset.from_list(part, features=features) for split, part in splits.items()})
        if kind in (OPEN, MULTIPLE_CHOICE):
            formats[name] = kind
        details[name] = {
            "source": raw.provenance,
            "format": kind,
            "columns": columns,
            "kept": report.kept,
            "dropped": {reason: report.dropped[reason] for reason in DROP_REASONS if reason in report.dropped},
            "notes": report.notes,
        }
        if report.default_reference:
            details[name]["default_reference"] = report.default_reference
    if request.benign is None:
        sets["benign"] = _templated_benign(request.seed)
        details["benign"] = {
            "source": {"spec": "templated", "kind": "templated", "seed": request.seed},
            "format": "benign",
            "columns": {},
            "kept": sum(len(part) for part in sets["benign"].values()),
            "dropped": {},
            "notes": ["no --benign given: the templated XSTest-like look-alikes measure over-refusal"],
        }
    order = ["harmful", "benign", *request.domains]
    sets = {name: sets[name] for name in order}
    manifest = {
        "generator": "import",
        "version": IMPORT_VERSION,
        "seed": request.seed,
        "split": dict(zip(synthetic.SPLITS, request.split, strict=True)),
        "max_chars": MAX_CHARS,
        "counts": {name: {split: len(parts[split]) for split in synthetic.SPLITS} for name, parts in sets.items()},
        "domains": list(request.domains),
        "domain_formats": formats,
        "sets": {name: details[name] for name in order},
    }
    synthetic.save_datasets(sets, request.out, manifest, force=request.force)
    return manifest


def _templated_benign(seed: int):
    """The templated generator's benign set (prompt and category), with its own splits."""
    benign = synthetic.generate_datasets(seed)["benign"]
    return benign.select_columns(["prompt", "category"])


def report_lines(manifest: dict) -> list[str]:
    """One line per set: its format, rows kept per split, and rows dropped by reason."""
    lines = []
    for name, details in manifest["sets"].items():
        counts = manifest["counts"][name]
        dropped = details["dropped"]
        dropped_text = ", ".join(f"{entry['count']} {reason}" for reason, entry in dropped.items()) or "none"
        lines.append(
            f"  {name:10s} {details['format']:15s} kept {details['kept']:6d} ("
            + " ".join(f"{split} {count}" for split, count in counts.items())
            + f")  dropped: {dropped_text}"
        )
        lines.extend(f"  {'':10s} {note}" for note in details["notes"])
    return lines


__all__ = ["ImportRequest", "import_datasets", "parse_source", "parse_split", "report_lines", "MAX_CHARS"]
