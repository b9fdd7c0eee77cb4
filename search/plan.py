"""The memory plan of one search worker, made before anything loads: from the models' config.json files and
safetensors headers only (no tensor data), the bytes that the vLLM generator, the Llama Guard judge, the merge store
and its scratch take on the GPU and in host memory; where the store lives; whether the worker fits; and the vLLM
options (dtype, KV-cache bytes, GPU share) that hold each engine to its part of the plan."""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from safemerge.errors import UserError
from safemerge.merges.engine import scratch_bytes
from safemerge.search.config import BASE_ROLE, SearchConfig
from safemerge.search.model_sources import HUB_PATTERNS
from safemerge.weights import SAFETENSORS_DTYPE_BYTES, TensorLayout, checkpoint_layout

GIB = 1 << 30
# The merge engine works through each tensor in row chunks of at most this many elements.
# Per engine on a GPU: the CUDA context, cuBLAS and NCCL workspaces (about 0.5-1 GiB a process) and the CUDA graphs
# vLLM captures for its batch sizes (up to about 1 GiB for an 8B model), rounded up.
GPU_ENGINE_FIXED_BYTES = 2 * GIB
# Per engine on the CPU build: no CUDA context or graphs; the runtime's own buffers.
CPU_ENGINE_FIXED_BYTES = GIB // 2
# Peak activations of a forward pass over a prefill chunk (vLLM's profile run): they grow with the model's width
# and depth, as its weights do; 10% of the weights is 1.5 GiB for Llama-3-8B.
ACTIVATION_SHARE = 0.10
# Llama Guard 3's prompt template (its instructions and the 14 categories, about 200 tokens; more with a custom
# category list) wraps the judged prompt and answer, so the judge's context is the generator's plus this.
GUARD_TEMPLATE_TOKENS = 512
# The judge writes about 10 tokens per conversation: its time is prefill, which vLLM batches by tokens, not by
# sequences, so 16 concurrent conversations lose little against 32 and halve its KV cache.
JUDGE_MAX_NUM_SEQS = 16
# The judge's context on the CPU: VLLMGenerator's default, which open_judge uses there.
CPU_JUDGE_MAX_MODEL_LEN = 512
# The CPU build sizes each engine's KV cache from VLLM_CPU_KVCACHE_SPACE (GiB); VLLMGenerator sets 1 when unset.
CPU_KV_CACHE_GIB = 1
# The worker process itself: Python, torch, vLLM and Ray imported (0.73 GiB resident measured on this machine),
# tokenizers, evaluation sets and the engines' host-side buffers.
HOST_BASE_BYTES = 2 * GIB
# Of the GPU, kept free: the engines' GPU shares are rounded up to the next 0.01 of the GPU, and vLLM refuses to
# start an engine whose share is more than the memory still free.
DEVICE_HEADROOM = 0.02
# The store goes on the GPU only with this much of it still spare: on the device it saves a PCIe copy per merge
# (about 2 s for three 8B models), which is not worth running close to out-of-memory.
STORE_ON_DEVICE_MARGIN = 0.10
# vLLM's dtype names -> bytes per element; safetensors dtypes -> vLLM's names.
ENGINE_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
_ENGINE_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


@dataclass(frozen=True)
class ModelLayout:
    """One model as the plan sees it: its config.json and the (name, dtype, shape) of every tensor."""

    role: str
    reference: str
    config: dict
    tensors: list[TensorLayout]

    @property
    def name(self) -> str:
        return Path(self.reference).name or self.reference

    def numel(self) -> int:
        return sum(math.prod(shape) for _, _, shape in self.tensors)

    def engine_dtype(self) -> str:
        """The dtype vLLM runs this checkpoint in on a GPU: config.json's, else the files' most common one."""
        declared = self.config.get("torch_dtype") or self.config.get("dtype")
        if declared in ENGINE_DTYPE_BYTES:
            return declared
        counts = Counter(dtype for _, dtype, _ in self.tensors if dtype in _ENGINE_DTYPES)
        return _ENGINE_DTYPES[counts.most_common(1)[0][0]] if counts else "float32"

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Keys and values of one token in every layer."""
        config = self.config
        missing = [key for key in ("num_hidden_layers", "num_attention_heads", "hidden_size") if key not in config]
        if missing:
            raise UserError(
                f"model {self.role!r}: config.json of {self.reference} lacks {', '.join(missing)}; the memory plan "
                "needs a decoder's config (a Hugging Face causal LM folder)"
            )
        heads = config["num_attention_heads"]
        kv_heads = config.get("num_key_value_heads") or heads
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        return 2 * config["num_hidden_layers"] * kv_heads * head_dim * dtype_bytes


@dataclass(frozen=True)
class EnginePlan:
    """One vLLM engine (the generator or the judge): what it holds, on the GPU or, with the CPU build, in memory."""

    model: str
    dtype: str
    max_model_len: int
    max_num_seqs: int
    weights_bytes: int
    kv_cache_bytes: int
    overhead_bytes: int
    on_gpu: bool

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.overhead_bytes


@dataclass(frozen=True)
class WorkerPlan:
    """What one worker holds, where, and whether it fits. `gpu_bytes` is one GPU's memory (None: unknown, then
    nothing on the device is checked) of which the worker has `gpu_share`; `store_on_device` is None when the GPU
    is unknown (the worker plans again on its own GPU)."""

    generator: EnginePlan
    judge: EnginePlan | None
    store_models: dict[str, int]  # role -> bytes at checkpoint precision
    store_dtypes: tuple[str, ...]  # the safetensors dtypes the store holds
    scratch_bytes: int
    ce_scorer_bytes: int  # the transformers cross-entropy scorer, on the CPU only
    uses_gpu: bool
    gpu_bytes: int | None
    gpu_share: float
    gpu_source: str
    host_memory_bytes: int | None
    host_source: str
    store_on_device: bool | None
    refusal: str | None = field(default=None, compare=False)

    @property
    def store_bytes(self) -> int:
        return sum(self.store_models.values())

    def engines(self) -> list[EnginePlan]:
        return [self.generator] + ([self.judge] if self.judge is not None else [])

    @property
    def device_bytes(self) -> int:
        if not self.uses_gpu:
            return 0
        store = self.store_bytes if self.store_on_device else 0
        return sum(engine.total_bytes for engine in self.engines()) + store + self.scratch_bytes

    @property
    def host_bytes(self) -> int:
        total = HOST_BASE_BYTES + self.ce_scorer_bytes
        if not self.uses_gpu:
            return total + sum(engine.total_bytes for engine in self.engines()) + self.store_bytes + self.scratch_bytes
        return total + (self.store_bytes if self.store_on_device is False else 0)

    @property
    def usable_gpu_bytes(self) -> int | None:
        """The worker's part of its GPU, less the headroom vLLM's start checks need."""
        if self.gpu_bytes is None:
            return None
        return int(self.gpu_bytes * self.gpu_share * (1 - DEVICE_HEADROOM))

    @property
    def fits_device(self) -> bool | None:
        if not self.uses_gpu or self.gpu_bytes is None:
            return None
        return self.device_bytes <= self.usable_gpu_bytes

    @property
    def fits_host(self) -> bool | None:
        return None if self.host_memory_bytes is None else self.host_bytes <= self.host_memory_bytes

    @property
    def fits(self) -> bool:
        return self.fits_device is not False and self.fits_host is not False

    def _engine_options(self, engine: EnginePlan | None) -> dict:
        if engine is None:
            return {}
        if not engine.on_gpu:
            return {"max_model_len": engine.max_model_len}  # the CPU build: float32, KV from VLLM_CPU_KVCACHE_SPACE
        options = {
            "max_model_len": engine.max_model_len,
            "dtype": engine.dtype,
            "max_num_seqs": engine.max_num_seqs,
            "kv_cache_memory_bytes": engine.kv_cache_bytes,
        }
        if self.gpu_bytes is not None:
            options["gpu_memory_utilization"] = gpu_memory_utilization(engine.total_bytes, self.gpu_bytes)
        return options

    def generator_options(self) -> dict:
        """Keyword arguments of VLLMGenerator for the generator engine (besides the model folder and the seed)."""
        return self._engine_options(self.generator)

    def judge_options(self) -> dict:
        """Keyword arguments of VLLMGenerator for the judge engine; empty without a guard judge."""
        return self._engine_options(self.judge)

    def rows(self) -> list[tuple[str, str, int | None, str]]:
        """(what, detail, bytes, where) of every part of the plan, then the totals and the memory they meet."""
        engine_place = "GPU" if self.uses_gpu else "host"
        rows = []
        for title, engine in (("generator", self.generator), ("judge", self.judge)):
            if engine is None:
                continue
            rows += [
                (f"{title} weights", f"{engine.model}, {engine.dtype}", engine.weights_bytes, engine_place),
                (
                    f"{title} KV cache",
                    f"{engine.max_num_seqs} seqs x {engine.max_model_len} tokens"
                    if engine.on_gpu
                    else "VLLM_CPU_KVCACHE_SPACE",
                    engine.kv_cache_bytes,
                    engine_place,
                ),
                (
                    f"{title} overhead",
                    "CUDA context, graphs, activations, logits" if engine.on_gpu else "runtime, activations, logits",
                    engine.overhead_bytes,
                    engine_place,
                ),
            ]
        dtypes = "/".join(self.store_dtypes)
        if not self.uses_gpu:
            store_place = "host"
        elif self.store_on_device is None:
            store_place = "host or GPU: the worker decides"
        else:
            store_place = "GPU" if self.store_on_device else "host (pinned)"
        rows += [
            (
                "merge store",
                f"{len(self.store_models)} models at checkpoint dtype {dtypes}",
                self.store_bytes,
                store_place,
            ),
            ("merge scratch", "fp32 row chunks + one output tensor", self.scratch_bytes, engine_place),
        ]
        if self.ce_scorer_bytes:
            rows.append(("CE scorer", "transformers, float32", self.ce_scorer_bytes, "host"))
        rows.append(("worker process", "Python, torch, vLLM, Ray, data", HOST_BASE_BYTES, "host"))
        if self.uses_gpu:
            rows += [
                ("device total", "", self.device_bytes, ""),
                ("GPU", self.gpu_source, None if self.gpu_bytes is None else int(self.gpu_bytes * self.gpu_share), ""),
            ]
        rows += [("host total", "", self.host_bytes, ""), ("host memory", self.host_source, self.host_memory_bytes, "")]
        return rows

    def verdict(self) -> str:
        """One line: fits (and how) or the refusal."""
        if not self.fits:
            return f"does not fit: {self.refusal}"
        if not self.uses_gpu:
            where = f"{_gib(self.host_bytes)} GiB of host memory, everything on the CPU"
        elif self.gpu_bytes is None:
            where = (
                f"GPU memory unknown (no CUDA device here, no workers.gpu_memory_gib): {_gib(self.device_bytes)} GiB "
                "on the device not checked; the worker plans again on its own GPU"
            )
        else:
            spare = self.usable_gpu_bytes - self.device_bytes
            store = "on the GPU" if self.store_on_device else "in pinned host memory"
            where = (
                f"{_gib(self.device_bytes)} GiB on the device ({_gib(spare)} GiB spare), "
                f"{_gib(self.host_bytes)} GiB of host memory; merge store {store}"
            )
        host = "" if self.fits_host is not None else "; host memory unknown, not checked"
        return f"fits: {where}{host}"

    def to_json(self) -> dict:
        return {
            "fits": self.fits,
            "verdict": self.verdict(),
            "refusal": self.refusal,
            "store_on_device": self.store_on_device,
            "device_bytes": self.device_bytes if self.uses_gpu else None,
            "host_bytes": self.host_bytes,
            "gpu_bytes": self.gpu_bytes,
            "gpu_share": self.gpu_share,
            "host_memory_bytes": self.host_memory_bytes,
            "rows": [{"what": w, "detail": d, "bytes": b, "where": p} for w, d, b, p in self.rows()],
            "generator_options": self.generator_options(),
            "judge_options": self.judge_options(),
        }


def gpu_memory_utilization(engine_bytes: int, gpu_bytes: int) -> float:
    """vLLM's gpu_memory_utilization for an engine of `engine_bytes`: its share of the GPU, rounded up to 0.01.
    With kv_cache_memory_bytes set, vLLM sizes the KV cache from that and only checks at start that this share is
    still free, so a larger share would keep the second engine from starting."""
    return min(1.0, math.ceil(engine_bytes / gpu_bytes * 100) / 100)


def _tensor_bytes(tensor: TensorLayout) -> int:
    _, dtype, shape = tensor
    return math.prod(shape) * SAFETENSORS_DTYPE_BYTES[dtype]


def _store_bytes(models: Sequence[Sequence[TensorLayout]]) -> int:
    """The merge engine's store: every tensor of every model (base, aligned, experts) at its checkpoint dtype."""
    return sum(_tensor_bytes(tensor) for model in models for tensor in model)


def _scratch_bytes(models: Sequence[Sequence[TensorLayout]]) -> int:
    """The merge engine's working memory: its fp32 chunk buffers (the engine's own count) and one output tensor
    being handed over, the largest tensor at its checkpoint dtype."""
    largest = max(_tensor_bytes(tensor) for model in models for tensor in model)
    shapes = [shape for _, dtype, shape in models[0] if dtype.startswith(("F", "BF"))]
    return scratch_bytes(shapes, task_vectors=len(models) - 1) + largest


def read_layout(config: SearchConfig, role: str, reference: str) -> ModelLayout:
    """config.json and the tensor headers of one model: a zoo model or a local folder, else a Hugging Face id
    through the hub's metadata (config.json and the safetensors headers, never the weights)."""
    label = f"model {role!r}"
    if reference.startswith("zoo:") or Path(reference).is_dir():
        folder = config.resolve_model(reference)
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise UserError(f"{label}: {config_path} is missing; a model folder needs its config.json")
        try:
            model_config = json.loads(config_path.read_text())
        except json.JSONDecodeError as error:
            raise UserError(f"{label}: {config_path} is not valid JSON ({error}); restore the file") from None
        return ModelLayout(role, str(folder), model_config, checkpoint_layout(folder, label))
    cached = _cached_snapshot(reference)
    if cached is not None:
        try:
            return replace(read_layout(config, role, str(cached)), reference=reference)
        except UserError:
            pass  # a partial snapshot (config.json only, a missing shard): ask the hub
    return _hub_layout(role, reference)


def _cached_snapshot(reference: str) -> Path | None:
    """The Hugging Face cache's snapshot of `reference` (a worker has downloaded its models), without the network."""
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(reference, allow_patterns=HUB_PATTERNS, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached, or no huggingface_hub: the hub's metadata then
        return None
    return folder if (folder / "config.json").is_file() else None


def _hub_layout(role: str, reference: str) -> ModelLayout:
    try:
        from huggingface_hub import HfApi, hf_hub_download

        model_config = json.loads(Path(hf_hub_download(reference, "config.json")).read_text())
        metadata = HfApi().get_safetensors_metadata(reference)
    except Exception as error:  # noqa: BLE001 - any hub failure becomes one clear line
        raise UserError(
            f"model {role!r}: {reference!r} is neither a folder nor readable on the Hugging Face hub "
            f"({type(error).__name__}); pass a local folder"
        ) from None
    tensors = [
        (name, info.dtype, tuple(info.shape))
        for file in metadata.files_metadata.values()
        for name, info in file.tensors.items()
    ]
    return ModelLayout(role, reference, model_config, tensors)


def _gpu_memory() -> tuple[int, str] | None:
    """This machine's CUDA device: (total bytes, its name), or None without one. The total comes from the device
    properties: torch.cuda.mem_get_info would create a CUDA context (about 0.5 GiB) on the GPU a worker shares."""
    import torch

    if not torch.cuda.is_available():
        return None
    properties = torch.cuda.get_device_properties(torch.cuda.current_device())
    return properties.total_memory, f"CUDA device {properties.name}"


def _host_memory() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except Exception:  # noqa: BLE001 - no psutil: /proc/meminfo, else unknown
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def _engine(model: ModelLayout, max_model_len: int, max_num_seqs: int, logit_tokens: int, on_gpu: bool) -> EnginePlan:
    # On the CPU the worker runs VLLMGenerator's float32; on a GPU the checkpoint's dtype.
    dtype = model.engine_dtype() if on_gpu else "float32"
    dtype_bytes = ENGINE_DTYPE_BYTES[dtype]
    weights = model.numel() * dtype_bytes
    if on_gpu:
        kv_cache = model.kv_bytes_per_token(dtype_bytes) * max_model_len * max_num_seqs
    else:
        kv_cache = int(float(os.environ.get("VLLM_CPU_KVCACHE_SPACE") or CPU_KV_CACHE_GIB) * GIB)
    vocab = model.config.get("vocab_size") or 0
    # Logits of `logit_tokens` positions at the model's dtype and their float32 log-softmax.
    logits = logit_tokens * vocab * (dtype_bytes + 4)
    fixed = GPU_ENGINE_FIXED_BYTES if on_gpu else CPU_ENGINE_FIXED_BYTES
    overhead = fixed + int(ACTIVATION_SHARE * weights) + logits
    return EnginePlan(model.name, dtype, max_model_len, max_num_seqs, weights, kv_cache, overhead, on_gpu)


def plan_from_layouts(
    config: SearchConfig,
    models: dict[str, ModelLayout],
    guard: ModelLayout | None,
    gpu: tuple[int, str] | None,
    host: tuple[int, str] | None,
) -> WorkerPlan:
    """The plan of a worker of `config` over already-read layouts (role -> model, and the judge's guard model);
    `gpu` and `host` are (bytes, where the figure comes from), or None when unknown."""
    workers, evaluation = config.workers, config.evaluation
    on_gpu = workers.gpus > 0
    # On a GPU the cross-entropies come from the generator's prompt log-probs: one whole sequence's logits at once.
    generator = _engine(
        models[BASE_ROLE],
        evaluation.max_model_len,
        workers.max_num_seqs,
        evaluation.max_model_len if on_gpu else workers.max_num_seqs,
        on_gpu,
    )
    judge = None
    if guard is not None:
        if on_gpu:
            context = evaluation.max_model_len + GUARD_TEMPLATE_TOKENS
            judge_len = min(context, guard.config.get("max_position_embeddings") or context)
        else:
            judge_len = CPU_JUDGE_MAX_MODEL_LEN
        judge_seqs = min(workers.max_num_seqs, JUDGE_MAX_NUM_SEQS)
        judge = _engine(guard, judge_len, judge_seqs, judge_seqs, on_gpu)
    layouts = list(models.values())
    store_models = {role: _store_bytes([model.tensors]) for role, model in models.items()}
    scratch = _scratch_bytes([model.tensors for model in layouts])
    # On the CPU the transformers scorer computes the cross-entropies (objectives.default_ce_backend), in float32.
    ce_scorer = 0 if on_gpu else models[BASE_ROLE].numel() * 4
    gpu_share = min(workers.gpus, 1.0) if on_gpu else 0.0  # each engine runs on one GPU (no tensor parallelism)
    gpu_bytes, gpu_source = (gpu if gpu is not None else (None, "unknown")) if on_gpu else (None, "none")
    host_bytes, host_source = host if host is not None else (None, "unknown")
    store_on_device: bool | None = False
    if on_gpu and gpu_bytes is None:
        store_on_device = None
    elif on_gpu:
        everything = sum(e.total_bytes for e in (generator, judge) if e) + sum(store_models.values()) + scratch
        store_on_device = everything <= gpu_bytes * gpu_share * (1 - STORE_ON_DEVICE_MARGIN)
    return WorkerPlan(
        generator=generator,
        judge=judge,
        store_models=store_models,
        store_dtypes=tuple(sorted({dtype for model in layouts for _, dtype, _ in model.tensors})),
        scratch_bytes=scratch,
        ce_scorer_bytes=ce_scorer,
        uses_gpu=on_gpu,
        gpu_bytes=gpu_bytes,
        gpu_share=gpu_share,
        gpu_source=gpu_source,
        host_memory_bytes=host_bytes,
        host_source=host_source,
        store_on_device=store_on_device,
    )


def plan_worker(
    config: SearchConfig, gpu_memory_bytes: int | None = None, host_memory_bytes: int | None = None
) -> WorkerPlan:
    """The memory plan of one worker of `config`, from config.json files and safetensors headers (no tensor data).

    One GPU's memory: `gpu_memory_bytes`, else `workers.gpu_memory_gib`, else this machine's CUDA device, else
    unknown (nothing on the device is checked). The machine's memory: `host_memory_bytes`, else
    `workers.host_memory_gib`, else this machine's where it is the worker's kind (no GPU asked for, or a CUDA
    device here), else unknown. `refusal` is set, with the fix, when the worker does not fit."""
    models = {role: read_layout(config, role, reference) for role, reference in config.models.roles().items()}
    guard = None
    if config.evaluation.judge.startswith("guard"):
        guard = read_layout(config, "guard", config.models.guard)
    workers = config.workers
    gpu = None
    if workers.gpus > 0:
        if gpu_memory_bytes is not None:
            gpu = (int(gpu_memory_bytes), "given")
        elif workers.gpu_memory_gib is not None:
            gpu = (int(workers.gpu_memory_gib * GIB), "workers.gpu_memory_gib")
        else:
            gpu = _gpu_memory()
    host = None
    if host_memory_bytes is not None:
        host = (int(host_memory_bytes), "given")
    elif workers.host_memory_gib is not None:
        host = (int(workers.host_memory_gib * GIB), "workers.host_memory_gib")
    elif workers.gpus == 0 or (gpu is not None and gpu[1].startswith("CUDA")):
        measured = _host_memory()
        host = (measured, "this machine") if measured is not None else None
    plan = plan_from_layouts(config, models, guard, gpu, host)
    if plan.fits:
        return plan
    return _with_refusal(plan, config, models, guard, gpu, host)


def _with_refusal(
    plan: WorkerPlan,
    config: SearchConfig,
    models: dict[str, ModelLayout],
    guard: ModelLayout | None,
    gpu: tuple[int, str] | None,
    host: tuple[int, str] | None,
) -> WorkerPlan:
    """`plan` with its one-line refusal: what does not fit (the GPU, the host, or both), and settings that exist
    and would make it fit."""

    def fits_device_with(**workers_update) -> bool:
        changed = config.model_copy(update={"workers": config.workers.model_copy(update=workers_update)})
        return plan_from_layouts(changed, models, guard, gpu, host).fits_device is not False

    problems, fixes = [], []
    if plan.fits_device is False:
        parts = [
            f"{title} {_gib(e.weights_bytes)} GiB weights + {_gib(e.kv_cache_bytes)} KV cache + "
            f"{_gib(e.overhead_bytes)} overhead"
            for title, e in (("generator", plan.generator), ("judge", plan.judge))
            if e is not None
        ]
        if plan.store_on_device:
            parts.append(f"merge store {_gib(plan.store_bytes)}")
        parts.append(f"merge scratch {_gib(plan.scratch_bytes)}")
        share = f" ({plan.gpu_share:g} of it, workers.gpus)" if plan.gpu_share < 1 else ""
        problems.append(
            f"worker does not fit one {_gib(plan.gpu_bytes)} GiB GPU{share}: needs {_gib(plan.device_bytes)} GiB "
            f"of {_gib(plan.usable_gpu_bytes)} usable ({'; '.join(parts)})"
        )
        seqs = next(
            (n for n in range(config.workers.max_num_seqs - 1, 0, -1) if fits_device_with(max_num_seqs=n)), None
        )
        if seqs is not None:
            fixes.append(f"workers.max_num_seqs: {seqs} (or a shorter evaluation.max_model_len)")
        if plan.gpu_share < 1 and fits_device_with(gpus=1.0):
            fixes.append("workers.gpus: 1 (a whole GPU per worker)")
        if plan.judge is not None and plan.device_bytes - plan.judge.total_bytes <= plan.usable_gpu_bytes:
            fixes.append(f"evaluation.judge: refusal (drops the judge's {_gib(plan.judge.total_bytes)} GiB)")
        needed = math.ceil(plan.device_bytes / (plan.gpu_share * (1 - DEVICE_HEADROOM)) / GIB)
        if plan.generator.weights_bytes > plan.usable_gpu_bytes:
            fixes.append(
                f"a GPU of at least {needed} GiB or a smaller model family (the generator's weights alone, "
                f"{_gib(plan.generator.weights_bytes)} GiB, exceed this GPU, and each engine runs on one GPU: no "
                "tensor parallelism)"
            )
        else:
            fixes.append(f"a GPU of at least {needed} GiB or a smaller model family")
    if plan.fits_host is False:
        parts = []
        if not plan.uses_gpu:
            parts.append(f"engines {_gib(sum(e.total_bytes for e in plan.engines()))} GiB")
        if not plan.uses_gpu or plan.store_on_device is False:
            parts.append(f"merge store {_gib(plan.store_bytes)}")
        if plan.ce_scorer_bytes:
            parts.append(f"CE scorer {_gib(plan.ce_scorer_bytes)}")
        parts.append(f"worker process {_gib(HOST_BASE_BYTES)}")
        lead = "worker does not fit" if not problems else "nor"
        problems.append(
            f"{lead} {_gib(plan.host_memory_bytes)} GiB of host memory ({plan.host_source}): needs "
            f"{_gib(plan.host_bytes)} GiB ({', '.join(parts)})"
        )
        fixes.append(f"machines of at least {math.ceil(plan.host_bytes / GIB)} GiB (workers.host_memory_gib)")
        if plan.uses_gpu and plan.fits_device is not False and plan.gpu_bytes is not None:
            on_device = sum(e.total_bytes for e in plan.engines()) + plan.store_bytes + plan.scratch_bytes
            needed = math.ceil(on_device / (plan.gpu_share * (1 - STORE_ON_DEVICE_MARGIN)) / GIB)
            fixes.append(f"a GPU of at least {needed} GiB, which holds the merge store itself")
        if len(plan.store_models) > 3:
            fixes.append("fewer experts")
    return replace(plan, refusal=f"{'; '.join(problems)}; fix: {' or '.join(fixes)}")


def check_plan(plan: WorkerPlan) -> None:
    """Refuse, in one line naming what does not fit and the fix, a worker that does not fit its GPU or machine."""
    if not plan.fits:
        raise UserError(plan.refusal)


def check_worker_memory(config: SearchConfig, log=print) -> WorkerPlan:
    """Plan one worker of `config` and refuse it when it does not fit, before any worker starts or weight loads;
    logs the verdict line."""
    plan = plan_worker(config)
    check_plan(plan)
    log(f"memory plan: {plan.verdict()}")
    return plan


def _gib(nbytes: int | None) -> str:
    if nbytes is None:
        return "?"
    return "<0.1" if 0 < nbytes < GIB / 20 else f"{nbytes / GIB:.1f}"


def format_plan(plan: WorkerPlan) -> str:
    """The plan as a table (GiB, where each part lives), the vLLM options it sets and the verdict line."""
    gpu = "no GPU" if not plan.uses_gpu else f"{plan.gpu_share:g} GPU"
    lines = [f"memory plan of one worker ({gpu}):", f"{'':18} {'':42} {'GiB':>7}  where"]
    for what, detail, nbytes, where in plan.rows():
        if what in ("device total", "host total"):
            lines.append(f"{'':18} {'':42} {'-------':>7}")
        lines.append(f"{what:18} {detail:42} {_gib(nbytes):>7}  {where}".rstrip())
    for title, options in (("generator", plan.generator_options()), ("judge", plan.judge_options())):
        if options and plan.uses_gpu and plan.fits:
            lines.append(f"vLLM {title}: " + ", ".join(f"{key}={value}" for key, value in options.items()))
    lines.append(plan.verdict())
    return "\n".join(lines)
