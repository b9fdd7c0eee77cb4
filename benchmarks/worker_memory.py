"""What one trial worker's merge engine costs: peak host memory (and device memory on a GPU) in bytes per model
parameter against the family's own bytes, and seconds per merge, for today's engine (git commit 86e1076, its
worker path `engine.merge(recipe)`) and the current tree's (its worker path `engine.iter_merge(recipe)`), each
merge streamed into a sink that stands for vLLM's weights; then the memory plan for Llama-3-8B and Llama-3-70B.

The family: a bf16 Llama-shaped random family (base + aligned + one expert; GQA, untied, vocabulary 32000) of
268.5M parameters per model, written once under --work and reused. Every measurement runs in its own process so
that its peak RSS (VmHWM) is that method's alone.

The sink: vLLM's `reload_weights` copies each merged tensor into the engine's own parameter, memory that belongs to
vLLM (on the GPU), not to the merge store. One buffer of the largest tensor's size, allocated and touched before the
pre-engine RSS is read, stands for those parameters: each merged tensor is copied into it and dropped, so the
figure counts what the merge store and the merge itself hold, and nothing of the consumer's.

Targets (issue 13), printed as pass/fail per method: the new engine's peak at most 1.15x the family's own bytes,
and its time per merge at most 1.5x today's on the same family.

Run: .venv/bin/python benchmarks/worker_memory.py [--methods ties slerp] [--trials 3] [--work DIR] [--threads N]
     [--device cpu|cuda] [--tiny] [--no-baseline] [--llama3-8b-gpu]
--tiny: a 4.9M-parameter family, a smoke test of both engines' paths. --llama3-8b-gpu: on a GPU, a Llama-3-8B-
shaped bf16 family generated on the GPU (48 GB on disk under --work), the new engine on cuda: max_memory_allocated
and seconds per merge per method (one process for all methods: loading 48 GB once per method would cost more than
the merges; VmHWM and the CUDA peak are reset between methods).
Last line: JSON with every figure.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The children import torch before safemerge, so safemerge's OpenMP setting (GOMP_SPINCOUNT, read when torch loads)
# would not reach them: set here, it reaches both engines' children through the environment, as a worker has it.
import safemerge  # noqa: F401

REPO = Path(__file__).resolve().parent.parent
BASELINE_COMMIT = "86e1076"
METHODS = ("task_arithmetic", "ties", "dare_ties", "della", "breadcrumbs_ties", "slerp")
EXPERTS = ("aligned", "expert")  # the worker's roles: base + aligned + one domain expert
DEFAULT_WORK = Path("/tmp/safemerge-bench/worker-memory")
PEAK_TARGET = 1.15  # new engine's peak host bytes / the family's own bytes
TIME_TARGET = 1.5  # new engine's seconds per merge / today's

# Shapes as keyword arguments of safemerge.zoo.random_family.LlamaShape (the child never imports that module, so it
# runs under the baseline's package too).
# 18 layers, hidden 1024, MLP 2816, 16 heads, 4 KV heads, vocabulary 32000, untied: 268,473,344 parameters.
FAMILY_SHAPE = dict(hidden=1024, intermediate=2816, layers=18, heads=16, kv_heads=4, vocab=32000, dtype="bfloat16")
# 4 layers, hidden 256, MLP 688, 8 heads, 2 KV heads, vocabulary 4096: 4,868,352 parameters (smoke test).
TINY_SHAPE = dict(hidden=256, intermediate=688, layers=4, heads=8, kv_heads=2, vocab=4096, dtype="bfloat16")
# Meta-Llama-3-8B: 8,030,261,248 parameters.
LLAMA3_8B_SHAPE = dict(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256, dtype="bfloat16")
GPU_SHARD_BYTES = 5 * 1024**3


def recipe_for(method: str) -> dict:
    """The recipe a worker merges for `method`, in the worker's model names (search/space.py's form)."""
    if method == "slerp":  # one path between the aligned model and the expert
        return {
            "merge_method": "slerp",
            "base_model": "aligned",
            "parameters": {"t": 0.5},
            "models": [{"model": "aligned"}, {"model": "expert"}],
        }
    per_model = {"weight": 0.6}
    if method != "task_arithmetic":
        per_model["density"] = 0.5
    if method == "della":
        per_model["epsilon"] = 0.1
    if method == "breadcrumbs_ties":
        per_model["gamma"] = 0.01
    models = [{"model": name, "parameters": dict(per_model)} for name in EXPERTS]
    return {"merge_method": method, "base_model": "base", "models": models, "seed": 0}


# Reading what the files hold, without safemerge (so the child reads it the same under either package).


def weight_files(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob("*.safetensors"))


def safetensors_header(path: Path) -> dict:
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header


ELEMENT_BYTES = {"F32": 4, "BF16": 2, "F16": 2, "F64": 8}
TORCH_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


def family_summary(folders: dict[str, Path]) -> dict:
    """Parameters per model, the largest tensor and its dtype, and the bytes of every weight file of the family."""
    entries = [entry for path in weight_files(folders["base"]) for entry in safetensors_header(path).values()]
    numel = [_numel(entry["shape"]) for entry in entries]
    largest = max(range(len(entries)), key=numel.__getitem__)
    file_bytes = sum(path.stat().st_size for folder in folders.values() for path in weight_files(folder))
    return {
        "parameters": sum(numel),
        "largest_elements": numel[largest],
        "dtype": TORCH_DTYPES[entries[largest]["dtype"]],
        "file_bytes": file_bytes,
        "models": len(folders),
    }


def _numel(shape: list[int]) -> int:
    count = 1
    for dimension in shape:
        count *= dimension
    return count


# The child: one engine, one or more methods, measured from inside.


def proc_status(field: str) -> int:
    """A /proc/self/status figure (VmRSS, VmHWM, RssAnon, RssFile) in bytes."""
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1)) * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux clear_refs 5); False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class Sink:
    """Stands for vLLM's weights: each merged tensor is copied into one preallocated buffer of the largest tensor's
    size (on the merge device, at the checkpoint's dtype) and dropped, as reload_weights copies into parameters that
    vLLM owns."""

    def __init__(self, elements: int, dtype, device) -> None:
        import torch

        self.buffer = torch.zeros(elements, dtype=dtype, device=device)  # zeros: resident before the RSS is read
        self.tensors = 0

    def consume(self, named_tensors) -> int:
        count = 0
        for _, tensor in named_tensors:
            self.buffer[: tensor.numel()].view(tensor.shape).copy_(tensor)
            count += 1
            del tensor
        self.tensors = count
        return count


def child(args: argparse.Namespace) -> dict:
    """Import torch and safemerge, read RSS, build the engine, merge each method twice to warm up and --trials
    times timed, streaming into the sink; report the figures as one JSON object."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import safemerge.merges.engine as engine_module
    from safemerge.merges.engine import MergeEngine
    from safemerge.merges.recipe import parse_recipe

    engine_file = Path(engine_module.__file__).resolve()
    expected = Path(args.expect_root).resolve() / "merges" / "engine.py"
    if engine_file != expected:
        raise SystemExit(f"the child imported {engine_file}, not {expected}; check PYTHONPATH")
    folders = {name: Path(args.work_family) / name for name in ("base", *EXPERTS)}
    family = family_summary(folders)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sink = Sink(family["largest_elements"], getattr(torch, family["dtype"]), device)
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    device_before = torch.cuda.memory_allocated() if cuda else 0
    rss_before = proc_status("VmRSS")
    peak_reset = reset_peak_rss()

    started = time.perf_counter()
    extra = {"store_device": args.store_device} if args.store_device else {}  # the new engine's option only
    experts = {name: folders[name] for name in EXPERTS}
    engine = MergeEngine(folders["base"], experts, base_name="base", device=device, **extra)
    if cuda:
        torch.cuda.synchronize()
    load_s = time.perf_counter() - started
    loaded = {
        "rss": proc_status("VmRSS") - rss_before,
        "rss_anon": proc_status("RssAnon"),
        "rss_file": proc_status("RssFile"),
        "peak": proc_status("VmHWM") - rss_before,
        "device": torch.cuda.memory_allocated() - device_before if cuda else None,
    }
    results = {}
    for index, method in enumerate(args.child.split(",")):
        recipe = parse_recipe(recipe_for(method), source=f"{method} recipe")
        if index > 0:  # later methods of one process: their own peaks, from what the engine holds now
            gc.collect()
            reset_peak_rss()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
        if args.engine == "baseline":
            # Today's worker (search/trial.py load()): merge() builds the whole merged model as a dict, which
            # load_weights then copies into vLLM's parameters.
            def merge(recipe=recipe):
                return sink.consume(engine.merge(recipe).items())
        else:
            # The new worker: tensors stream one at a time into reload_weights.
            def merge(recipe=recipe):
                return sink.consume(engine.iter_merge(recipe))

        times = []
        for trial in range(2 + args.trials):
            started = time.perf_counter()
            merge()
            if cuda:
                torch.cuda.synchronize()
            if trial >= 2:
                times.append(time.perf_counter() - started)
        results[method] = {
            "seconds": times,
            "seconds_median": statistics.median(times),
            "peak_rss": proc_status("VmHWM") - rss_before,
            "device_peak": torch.cuda.max_memory_allocated() - device_before if cuda else None,
            "tensors": sink.tensors,
        }
    return {
        "engine_file": str(engine_file),
        "engine_sha256": hashlib.sha256(engine_file.read_bytes()).hexdigest()[:12],  # which engine, when it changes
        "device": str(device),
        "threads": torch.get_num_threads(),
        "rss_before_engine": rss_before,
        "peak_reset": peak_reset,
        "load_s": load_s,
        "loaded": loaded,
        "methods": results,
    }


# The parent: the family, the baseline's source, one child per measurement, the tables.


def build_family(work: Path, shape_args: dict) -> dict[str, Path]:
    from safemerge.zoo.random_family import LlamaShape, write_random_family

    return write_random_family(work, LlamaShape(**shape_args), EXPERTS)


def build_family_on_gpu(
    work: Path, shape_args: dict, shard_bytes: int = GPU_SHARD_BYTES, device: str = "cuda"
) -> dict[str, Path]:
    """The family of `shape_args` generated tensor by tensor on the GPU (base normal 0.02, each expert the base plus
    a normal delta of 0.002, cast to the shape's dtype), written as shards of at most `shard_bytes` with a
    model.safetensors.index.json. Host memory: one shard per model. Folders already complete there are kept.
    (`device` cpu checks the writer on a machine without a GPU.)"""
    import torch
    from safetensors.torch import save_file

    from safemerge.weights import SAFETENSORS_INDEX
    from safemerge.zoo.random_family import BASE_SCALE, DELTA_SCALE, DTYPES, LlamaShape

    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "--llama3-8b-gpu generates its family on a GPU and torch sees none here (torch.cuda.is_available() is "
            "False); run it on a machine with a CUDA GPU, or drop --llama3-8b-gpu to measure the 268M family"
        )
    shape = LlamaShape(**shape_args)
    folders = {name: work / name for name in ("base", *EXPERTS)}
    marker = work / "gpu-family.json"
    if marker.is_file() and json.loads(marker.read_text()) == shape_args:
        return folders
    marker.unlink(missing_ok=True)
    for folder in folders.values():  # a partial family of an earlier run: rewritten, and its room counts as free
        shutil.rmtree(folder, ignore_errors=True)
    dtype = DTYPES[shape.dtype]
    element = torch.empty((), dtype=dtype).element_size()
    shapes = shape.tensor_shapes()
    need = len(folders) * sum(_numel(size) for size in shapes.values()) * element
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free
    if free < need * 1.02:
        raise SystemExit(
            f"the Llama-3-8B-shaped family needs {need / 1e9:.1f} GB under {work} and {free / 1e9:.1f} GB are free; "
            "pass --work on a disk with room"
        )
    groups: list[list[str]] = [[]]
    filled = 0
    for name, size in shapes.items():
        if groups[-1] and filled + _numel(size) * element > shard_bytes:
            groups.append([])
            filled = 0
        groups[-1].append(name)
        filled += _numel(size) * element
    files = {
        name: f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        for number, group in enumerate(groups, 1)
        for name in group
    }
    for folder in folders.values():
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(shape.config(), indent=2))
    generator = torch.Generator(device=device).manual_seed(0)
    for group in groups:
        shard = {model: {} for model in folders}
        for name in group:
            base = torch.randn(shapes[name], generator=generator, device=device) * BASE_SCALE
            if name.endswith("norm.weight"):
                base += 1.0
            for model in folders:
                value = (
                    base
                    if model == "base"
                    else base + DELTA_SCALE * torch.randn(shapes[name], generator=generator, device=device)
                )
                shard[model][name] = value.to(dtype).cpu()
            del base, value
        for model, folder in folders.items():
            save_file(shard[model], str(folder / files[group[0]]), metadata={"format": "pt"})
        del shard
    total = sum(_numel(size) for size in shapes.values()) * element
    for folder in folders.values():
        index = {"metadata": {"total_size": total}, "weight_map": files}
        (folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))
    marker.write_text(json.dumps(shape_args))
    return folders


def baseline_source(work: Path) -> Path:
    """Today's source tree (commit 86e1076) unpacked under `work`, once."""
    target = work / f"baseline-{BASELINE_COMMIT}"
    if (target / "merges" / "engine.py").is_file():
        return target
    partial = work / f"baseline-{BASELINE_COMMIT}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", BASELINE_COMMIT], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(partial)], input=archive, check=True)
    partial.rename(target)
    return target


def run_child(engine: str, methods: list[str], family_folder: Path, args: argparse.Namespace, source: Path) -> dict:
    """One child process: `engine` is "baseline" (imports the package under `source`) or "new" (this tree)."""
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    if engine == "baseline":
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(source), env.get("PYTHONPATH")]))
    command = [sys.executable, str(Path(__file__).resolve()), "--child", ",".join(methods), "--engine", engine]
    command += ["--work-family", str(family_folder), "--expect-root", str(source), "--trials", str(args.trials)]
    command += ["--device", args.device] + (["--threads", str(args.threads)] if args.threads else [])
    if engine == "new" and args.store_device:
        command += ["--store-device", args.store_device]
    process = subprocess.run(command, cwd=source, env=env, capture_output=True, text=True)
    if process.returncode != 0:
        raise SystemExit(f"{engine} engine on {','.join(methods)} failed:\n{process.stderr[-4000:]}")
    return json.loads(process.stdout.strip().splitlines()[-1])


def plan_section() -> tuple[list[str], dict | None]:
    """The memory plan's table for Llama-3-8B and Llama-3-70B families (configs/llama3-medical.yaml's shape: one
    80 GiB GPU on a 256 GiB machine), planned over header-only stubs of the real checkpoints."""
    try:
        from safemerge.search.config import load_config
        from safemerge.search.plan import format_plan, plan_worker
        from safemerge.zoo.stubs import STUB_FAMILIES, write_stub_family
    except ImportError as error:
        line = f"memory plan: safemerge.search.plan is missing ({error}); no plan table for Llama-3-8B / 70B"
        return [line], None
    lines, figures = [], {}
    with tempfile.TemporaryDirectory(prefix="worker-memory-stubs-") as out:
        for family in STUB_FAMILIES:
            config_path = write_stub_family(Path(out), family)
            plan = plan_worker(load_config(config_path))
            lines += [f"{family} (header-only stubs, {config_path.name}):", format_plan(plan), ""]
            figures[family] = plan.to_json()
    return lines, figures


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, metavar="METHOD")
    parser.add_argument("--trials", type=int, default=3, help="timed merges per method after 2 warm-up merges")
    parser.add_argument("--work", type=Path, default=None, help=f"family and baseline source (default {DEFAULT_WORK})")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default=None, help="merge device (default: cuda when present, else cpu)")
    parser.add_argument(
        "--store-device",
        default=None,
        help="where the new engine holds the models (default: the merge device; cpu = pinned host memory on a GPU)",
    )
    parser.add_argument("--tiny", action="store_true", help="a 4.9M-parameter family: a smoke test")
    parser.add_argument("--no-baseline", action="store_true", help="measure only the current tree's engine")
    parser.add_argument(
        "--llama3-8b-gpu",
        action="store_true",
        help="on a GPU: a Llama-3-8B-shaped bf16 family generated on the GPU; max_memory_allocated and s/merge",
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--engine", choices=("baseline", "new"), default="new", help=argparse.SUPPRESS)
    parser.add_argument("--work-family", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--expect-root", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    import torch

    cuda = torch.cuda.is_available()
    args.device = args.device or ("cuda" if cuda else "cpu")
    if args.device.startswith("cuda") and not cuda:
        raise SystemExit(f"--device {args.device}: torch sees no CUDA device here; use --device cpu")
    work = args.work or DEFAULT_WORK
    if args.llama3_8b_gpu:
        if not cuda or not args.device.startswith("cuda"):
            raise SystemExit(
                "--llama3-8b-gpu measures the merge on a GPU and torch sees none here (torch.cuda.is_available() is "
                f"{cuda}, --device {args.device}); run it on a machine with a CUDA GPU"
            )
        shape_args, label = LLAMA3_8B_SHAPE, "llama3-8b-bf16"
    elif args.tiny:
        shape_args, label = TINY_SHAPE, "tiny-bf16"
    else:
        shape_args, label = FAMILY_SHAPE, "llama-268m-bf16"
    family_folder = work / label
    started = time.perf_counter()
    if args.llama3_8b_gpu:
        folders = build_family_on_gpu(family_folder, shape_args)
    else:
        folders = build_family(family_folder, shape_args)
    build_s = time.perf_counter() - started
    family = family_summary(folders)
    parameters = family["parameters"]
    from safemerge.zoo.random_family import LlamaShape

    expected = LlamaShape(**shape_args).parameters()
    if parameters != expected:
        raise SystemExit(f"{family_folder} holds {parameters:,} parameters per model, not {expected:,}; delete it")
    family_bpp = family["file_bytes"] / parameters
    run_baseline = not args.no_baseline and not args.llama3_8b_gpu
    baseline_root = baseline_source(work) if run_baseline else None
    print(
        f"family {family_folder}: {parameters:,} parameters per model ({parameters / 1e6:.1f}M), "
        f"{family['models']} models at {family['dtype']}, {family['file_bytes'] / 1e9:.2f} GB of files = "
        f"{family_bpp:.2f} bytes per model parameter (written in {build_s:.0f} s or reused)",
        flush=True,
    )

    measurements: dict[str, dict] = {}
    if args.llama3_8b_gpu:  # one process, every method: the family is 48 GB to read
        new = run_child("new", args.methods, family_folder, args, REPO)
        for method in args.methods:
            measurements[method] = {"new": {**new, "methods": None, **new["methods"][method]}}
    else:
        for method in args.methods:
            measurements[method] = {}
            for engine, root in (("baseline", baseline_root), ("new", REPO)):
                if root is None:
                    continue
                result = run_child(engine, [method], family_folder, args, root)
                measurements[method][engine] = {**result, "methods": None, **result["methods"][method]}
                row = measurements[method][engine]
                print(
                    f"  {method:17s} {engine:8s} load {row['load_s']:6.1f} s, after load "
                    f"{row['loaded']['rss'] / parameters:5.2f} B/param, peak {row['peak_rss'] / parameters:5.2f} "
                    f"B/param, {row['seconds_median']:.3f} s/merge  ({row['engine_file']} {row['engine_sha256']})",
                    flush=True,
                )

    rows = {}
    for method, by_engine in measurements.items():
        baseline, new = by_engine.get("baseline"), by_engine.get("new")
        row = {}
        for engine, result in (("baseline", baseline), ("new", new)):
            if result is None:
                continue
            row[engine] = {
                "load_s": round(result["load_s"], 2),
                "loaded_bytes_per_param": round(result["loaded"]["rss"] / parameters, 3),
                "peak_bytes_per_param": round(result["peak_rss"] / parameters, 3),
                "peak_x_family": round(result["peak_rss"] / parameters / family_bpp, 3),
                "s_per_merge": round(result["seconds_median"], 4),
                "seconds": [round(value, 4) for value in result["seconds"]],
                "device_peak_bytes_per_param": (
                    round(result["device_peak"] / parameters, 3) if result["device_peak"] is not None else None
                ),
                "device_peak_gb": (
                    round(result["device_peak"] / 1e9, 2) if result["device_peak"] is not None else None
                ),
                "tensors": result["tensors"],
                "engine_sha256": result.get("engine_sha256"),
            }
        if new is not None:
            row["peak_pass"] = row["new"]["peak_x_family"] <= PEAK_TARGET
            time_ratio = ratio(new["seconds_median"], baseline and baseline["seconds_median"])
            row["time_ratio"] = round(time_ratio, 3) if time_ratio is not None else None
            row["time_pass"] = time_ratio <= TIME_TARGET if time_ratio is not None else None
        rows[method] = row

    any_result = next(iter(next(iter(measurements.values())).values()))
    print(
        f"\n{parameters / 1e6:.1f}M parameters per model, {family['dtype']}; family {family_bpp:.2f} bytes per model "
        f"parameter; device {any_result['device']}; torch threads {any_result['threads']}; load average "
        f"{os.getloadavg()[0]:.1f}; {args.trials} timed merges after 2 warm-up (median)"
    )
    header = ["method", "base B/p", "new B/p", "base x fam", "new x fam", "base s", "new s", "new/base s"]
    header += ["peak<=1.15x", "time<=1.5x"]
    cuda_columns = args.device.startswith("cuda")
    if cuda_columns:
        header += ["base dev B/p", "new dev B/p", "new dev GB"]
    print("  ".join(f"{cell:>12s}" for cell in header))

    def cell(row: dict, engine: str, key: str):
        return row.get(engine, {}).get(key)

    def verdict(value):
        return "-" if value is None else ("pass" if value else "FAIL")

    for method, row in rows.items():
        cells = [
            method,
            cell(row, "baseline", "peak_bytes_per_param"),
            cell(row, "new", "peak_bytes_per_param"),
            cell(row, "baseline", "peak_x_family"),
            cell(row, "new", "peak_x_family"),
            cell(row, "baseline", "s_per_merge"),
            cell(row, "new", "s_per_merge"),
            row.get("time_ratio"),
            verdict(row.get("peak_pass")),
            verdict(row.get("time_pass")),
        ]
        if cuda_columns:
            cells += [
                cell(row, "baseline", "device_peak_bytes_per_param"),
                cell(row, "new", "device_peak_bytes_per_param"),
                cell(row, "new", "device_peak_gb"),
            ]
        print("  ".join(f"{'-' if value is None else value:>12}" for value in cells))
    print(
        "B/p = peak host RSS (VmHWM) minus the RSS before the engine was built, per model parameter; x fam = that "
        f"over the family's own {family_bpp:.2f} B/p; s = seconds per merge streamed into the sink (median). "
        f"Baseline = commit {BASELINE_COMMIT}'s engine.merge() (its worker path), new = this tree's iter_merge()."
    )

    plan_lines, plan_figures = plan_section()
    print()
    for line in plan_lines:
        print(line)
    print(
        json.dumps(
            {
                "family": {
                    "folder": str(family_folder),
                    "parameters": parameters,
                    "dtype": family["dtype"],
                    "file_bytes": family["file_bytes"],
                    "bytes_per_param": round(family_bpp, 3),
                },
                "device": any_result["device"],
                "threads": any_result["threads"],
                "trials": args.trials,
                "baseline_commit": BASELINE_COMMIT,
                "targets": {"peak_x_family": PEAK_TARGET, "time_ratio": TIME_TARGET},
                "methods": rows,
                "plan": plan_figures,
            }
        )
    )


if __name__ == "__main__":
    main()
