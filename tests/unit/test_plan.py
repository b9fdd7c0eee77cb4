"""The memory plan, on header-only stubs of the real models (their config.json and safetensors headers, no data):
the Llama-3-8B family with its Llama Guard judge fits one 80 GiB GPU, the 70B family does not and the refusal says
why and how to fix it, `search plan`, `search run` and the Ray job refuse with exit code 2 before anything is
written; and the header reader and the index checks it rests on."""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from safemerge.cli import main
from safemerge.cluster import job
from safemerge.errors import UserError
from safemerge.search.config import load_config
from safemerge.search.plan import GIB, check_plan, format_plan, plan_worker
from safemerge.weights import checkpoint_layout, read_safetensors_header, weight_files
from safemerge.zoo.stubs import STUB_FAMILIES, write_header_stub, write_stub_family

# Parameters of the published checkpoints (embeddings and lm_head untied, grouped-query attention).
LLAMA3_8B_PARAMETERS = 8_030_261_248
LLAMA3_70B_PARAMETERS = 70_553_706_496


@pytest.fixture(scope="module")
def stubs(tmp_path_factory) -> dict[str, Path]:
    """family -> its search config (configs/llama3-medical.yaml's shape, one 80 GiB GPU on a 256 GiB machine)."""
    out = tmp_path_factory.mktemp("stubs")
    return {family: write_stub_family(out, family) for family in STUB_FAMILIES}


def edited(path: Path, tmp_path: Path, **workers) -> Path:
    """A copy of the config at `path` with `workers` fields changed."""
    data = yaml.safe_load(path.read_text())
    data["workers"].update(workers)
    copy = tmp_path / path.name
    copy.write_text(yaml.safe_dump(data))
    return copy


def test_the_stubs_hold_the_real_models_layout_and_no_tensor_data(stubs):
    models = yaml.safe_load(stubs["llama3-8b"].read_text())["models"]
    base = Path(models["base"])
    layout = checkpoint_layout(base, "model 'base'")
    assert sum(math.prod(shape) for _, _, shape in layout) == LLAMA3_8B_PARAMETERS
    assert {dtype for _, dtype, _ in layout} == {"BF16"}
    shapes = {name: shape for name, _, shape in layout}
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (1024, 4096)  # 8 key-value heads of 128
    assert shapes["lm_head.weight"] == (128256, 4096)
    assert len(weight_files(base, "base")) == 4
    seventy = Path(yaml.safe_load(stubs["llama3-70b"].read_text())["models"]["base"])
    assert sum(math.prod(s) for _, _, s in checkpoint_layout(seventy, "70b")) == LLAMA3_70B_PARAMETERS
    assert len(weight_files(seventy, "70b")) == 30
    # Each file is its 8-byte length and its header, nothing after: whatever the plan reads, it is no tensor data.
    for folder in {Path(path) for path in [*models.values(), *models["experts"].values()] if isinstance(path, str)}:
        for shard in weight_files(folder, folder.name):
            (length,) = struct.unpack("<Q", shard.read_bytes()[:8])
            assert shard.stat().st_size == 8 + length


def test_the_8b_family_with_llama_guard_fits_one_80_gib_gpu(stubs):
    plan = plan_worker(load_config(stubs["llama3-8b"]))
    assert plan.fits, plan.refusal
    check_plan(plan)
    generator, judge = plan.generator, plan.judge
    assert generator.dtype == "bfloat16" and generator.weights_bytes == 2 * LLAMA3_8B_PARAMETERS
    # 2 (keys, values) x 32 layers x 8 heads x 128 x 2 bytes per token, 4096 tokens x 32 sequences.
    assert generator.kv_cache_bytes == 2 * 32 * 8 * 128 * 2 * 4096 * 32 == 16 * GIB
    assert judge is not None and judge.model == "Llama-Guard-3-8B" and judge.weights_bytes == 2 * LLAMA3_8B_PARAMETERS
    assert judge.max_model_len > generator.max_model_len  # the guard's template wraps the judged conversation
    assert plan.store_bytes == 3 * 2 * LLAMA3_8B_PARAMETERS  # base, aligned, medical at bf16
    # Both engines and the store do not fit 80 GiB together: the store waits in pinned host memory.
    assert plan.store_on_device is False
    assert plan.device_bytes <= 80 * GIB < plan.device_bytes + plan.store_bytes
    assert plan.host_bytes >= plan.store_bytes
    options = plan.generator_options()
    assert options["dtype"] == "bfloat16" and options["kv_cache_memory_bytes"] == 16 * GIB
    assert options["max_model_len"] == 4096 and options["max_num_seqs"] == 32
    # vLLM's GPU shares: each engine's bytes over the GPU, and both together leave the GPU's headroom.
    judge_options = plan.judge_options()
    assert options["gpu_memory_utilization"] >= generator.total_bytes / (80 * GIB)
    assert options["gpu_memory_utilization"] + judge_options["gpu_memory_utilization"] < 0.98
    assert judge_options["max_model_len"] == judge.max_model_len and judge_options["max_num_seqs"] == 16
    text = format_plan(plan)
    for row in ("generator weights", "generator KV cache", "judge weights", "merge store", "device total", "GPU"):
        assert row in text
    assert text.splitlines()[-1].startswith("fits: ")


def test_a_gpu_that_holds_everything_keeps_the_store_on_the_device(stubs):
    plan = plan_worker(load_config(stubs["llama3-8b"]), gpu_memory_bytes=141 * GIB)  # an H200
    assert plan.fits and plan.store_on_device is True
    assert plan.device_bytes > plan.store_bytes
    assert plan.host_bytes < 4 * GIB  # the store is no longer in host memory


def test_the_70b_family_does_not_fit_and_the_refusal_says_why(stubs):
    plan = plan_worker(load_config(stubs["llama3-70b"]))
    assert not plan.fits
    assert plan.generator.weights_bytes == 2 * LLAMA3_70B_PARAMETERS
    with pytest.raises(UserError) as refused:
        check_plan(plan)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("worker does not fit one 80.0 GiB GPU: needs ")
    assert "generator 131.4 GiB weights" in message
    assert "no tensor parallelism" in message and "smaller model family" in message
    # Its store of three 70B models (394 GiB) does not fit the 256 GiB machine either.
    assert "nor 256.0 GiB of host memory" in message
    assert format_plan(plan).splitlines()[-1].startswith("does not fit: worker does not fit one 80.0 GiB GPU")


def test_a_kv_cache_too_large_for_the_gpu_names_a_max_num_seqs_that_fits(stubs, tmp_path):
    config = load_config(edited(stubs["llama3-8b"], tmp_path, max_num_seqs=256))
    plan = plan_worker(config)
    assert not plan.fits
    message = plan.refusal
    assert "generator 15.0 GiB weights + 128.0 KV cache" in message
    suggested = int(message.split("workers.max_num_seqs: ")[1].split()[0])
    assert 1 <= suggested < 256
    assert plan_worker(load_config(edited(stubs["llama3-8b"], tmp_path, max_num_seqs=suggested))).fits
    assert not plan_worker(load_config(edited(stubs["llama3-8b"], tmp_path, max_num_seqs=suggested + 1))).fits
    assert "evaluation.judge" not in message  # the generator alone does not fit: dropping the judge is no fix
    smaller = plan_worker(load_config(edited(stubs["llama3-8b"], tmp_path, gpu_memory_gib=60)))
    assert not smaller.fits and "workers.max_num_seqs: " in smaller.refusal
    assert "evaluation.judge: refusal (drops the judge's " in smaller.refusal


def test_a_machine_too_small_for_the_store_is_refused_with_the_memory_it_needs(stubs, tmp_path):
    plan = plan_worker(load_config(edited(stubs["llama3-8b"], tmp_path, host_memory_gib=32)))
    assert plan.fits_device and plan.fits_host is False
    assert plan.refusal.startswith("worker does not fit 32.0 GiB of host memory (workers.host_memory_gib): needs ")
    assert "merge store 44.9" in plan.refusal
    assert "machines of at least 47 GiB" in plan.refusal and "which holds the merge store itself" in plan.refusal


def test_a_worker_with_half_a_gpu_plans_for_half(stubs, tmp_path):
    plan = plan_worker(load_config(edited(stubs["llama3-8b"], tmp_path, gpus=0.5)))
    assert plan.gpu_share == 0.5 and not plan.fits
    assert "(0.5 of it, workers.gpus)" in plan.refusal and "workers.gpus: 1" in plan.refusal


def test_a_cpu_worker_holds_everything_in_host_memory(stubs, tmp_path):
    plan = plan_worker(load_config(edited(stubs["llama3-8b"], tmp_path, gpus=0, host_memory_gib=1024)))
    assert plan.fits and not plan.uses_gpu and plan.device_bytes == 0
    assert plan.generator.dtype == "float32"  # what VLLMGenerator runs on the CPU
    assert plan.ce_scorer_bytes == 4 * LLAMA3_8B_PARAMETERS  # the transformers scorer, float32
    assert plan.host_bytes > plan.store_bytes + plan.generator.weights_bytes
    assert plan.generator_options() == {"max_model_len": 4096}  # the CPU build keeps its own KV sizing
    assert "GPU" not in format_plan(plan).split("host total")[0].split("where")[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="here the plan reads the CUDA device")
def test_without_a_gpu_figure_the_device_is_not_checked_and_the_plan_says_so(stubs, tmp_path):
    path = stubs["llama3-8b"]
    data = yaml.safe_load(path.read_text())
    del data["workers"]["gpu_memory_gib"], data["workers"]["host_memory_gib"]
    (tmp_path / "unknown.yaml").write_text(yaml.safe_dump(data))
    plan = plan_worker(load_config(tmp_path / "unknown.yaml"))
    assert plan.fits and plan.fits_device is None and plan.store_on_device is None
    assert "GPU memory unknown" in plan.verdict() and "host memory unknown, not checked" in plan.verdict()
    assert "gpu_memory_utilization" not in plan.generator_options()


def test_search_plan_exits_0_when_it_fits_and_2_with_one_line_when_not(stubs, capsys):
    assert main(["search", "plan", str(stubs["llama3-8b"])]) == 0
    captured = capsys.readouterr()
    assert "merge store" in captured.out and captured.out.strip().splitlines()[-1].startswith("fits: ")
    assert main(["search", "plan", str(stubs["llama3-70b"])]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1
    assert captured.err.startswith("safemerge: error: worker does not fit one 80.0 GiB GPU")
    assert main(["search", "plan", str(stubs["llama3-8b"]), "--json", "--gpu-memory-gib", "141"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["fits"] and report["store_on_device"] and report["gpu_bytes"] == 141 * GIB
    assert report["generator_options"]["dtype"] == "bfloat16"
    assert main(["search", "plan", str(stubs["llama3-8b"]), "--set", "workers.max_num_seqs=512"]) == 2
    assert "workers.max_num_seqs: " in capsys.readouterr().err


def test_search_run_and_the_ray_job_refuse_before_anything_is_written(stubs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["search", "run", str(stubs["llama3-70b"])]) == 2
    assert "worker does not fit one 80.0 GiB GPU" in capsys.readouterr().err
    assert job.main(["--config", str(stubs["llama3-70b"]), "--home", str(tmp_path)]) == 2
    assert "worker does not fit one 80.0 GiB GPU" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no data, no study, no results


def test_a_weight_index_naming_a_file_outside_the_folder_is_refused(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    write_header_stub(model / "model-00001-of-00001.safetensors", {"w": ("BF16", (2, 2))})
    write_header_stub(tmp_path / "x.safetensors", {"v": ("BF16", (2,))})
    for entry in ("../x.safetensors", str(tmp_path / "x.safetensors"), "sub/../../x.safetensors"):
        index = {"weight_map": {"w": "model-00001-of-00001.safetensors", "v": entry}}
        (model / "model.safetensors.index.json").write_text(json.dumps(index))
        with pytest.raises(UserError, match=r"model 'medical': model\.safetensors\.index\.json maps v to ") as error:
            weight_files(model, "model 'medical'")
        assert "a file outside" in str(error.value) and "fix that entry of the index" in str(error.value)
        assert entry in str(error.value)
    # A symlinked folder, and shards that are symlinks out of it (as in a Hugging Face cache snapshot), are fine.
    index = {"weight_map": {"w": "model-00001-of-00001.safetensors"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    (model / "model-00001-of-00001.safetensors").rename(tmp_path / "blob")
    os.symlink(tmp_path / "blob", model / "model-00001-of-00001.safetensors")
    os.symlink(model, tmp_path / "linked")
    assert [path.name for path in weight_files(tmp_path / "linked", "linked")] == ["model-00001-of-00001.safetensors"]
    assert checkpoint_layout(tmp_path / "linked", "linked") == [("w", "BF16", (2, 2))]


def test_the_header_reader_reads_stubs_that_safe_open_refuses_and_names_broken_files(tmp_path):
    from safetensors import safe_open

    stub = tmp_path / "stub.safetensors"
    write_header_stub(stub, {"a": ("BF16", (3, 4)), "b": ("F32", (5,))})
    assert read_safetensors_header(stub) == {"a": ("BF16", (3, 4)), "b": ("F32", (5,))}
    with pytest.raises(Exception):  # noqa: B017 - safetensors' own error type: it wants the data too
        safe_open(str(stub), framework="pt")
    real = tmp_path / "real.safetensors"
    save_file({"t": torch.zeros(2, 3, dtype=torch.float16)}, str(real), metadata={"format": "pt"})
    assert read_safetensors_header(real) == {"t": ("F16", (2, 3))}  # __metadata__ is skipped
    raw = real.read_bytes()
    cases = {
        "short": (raw[:5], "shorter than the 8-byte header length: truncated"),
        "cut": (raw[:20], "the file ends after 12: truncated"),
        "garbled": (struct.pack("<Q", 4) + b"{{{{", "its header is not JSON"),
        "huge": (struct.pack("<Q", 1 << 40), "its header length field says"),
        "list": (struct.pack("<Q", 2) + b"[]", "not a mapping of tensor names"),
    }
    for name, (content, fragment) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(content)
        with pytest.raises(UserError, match=rf"{path} is not a safetensors file \(.*{fragment}.*re-download it"):
            read_safetensors_header(path)
    header = json.dumps({"t": {"dtype": "F16", "shape": [2, 3], "data_offsets": [0, 10]}}).encode()
    (tmp_path / "offsets.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(UserError, match=r"tensor 't' of shape \(2, 3\) in F16 spans data offsets \[0, 10\], not 12"):
        read_safetensors_header(tmp_path / "offsets.safetensors")


def test_the_plan_refuses_pickle_checkpoints_with_the_fix(tmp_path):
    model = tmp_path / "old"
    model.mkdir()
    torch.save({"w": torch.zeros(2)}, model / "pytorch_model.bin")
    with pytest.raises(UserError, match=r"model 'base': .*pytorch_model\.bin is a pickle checkpoint; .*convert"):
        checkpoint_layout(model, "model 'base'")
