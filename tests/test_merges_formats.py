"""The merge engine on the checkpoint formats real families come in, each on a small random family that has it:
sharded safetensors with an index, bf16 and fp16 weights, tied embeddings, grouped-query attention and attention
biases (Qwen2-shaped). Readable formats merge to mergekit's tensors (1e-5 on fp32; on bf16, within one bf16 ulp of
`mergekit-yaml` computing in fp32); unmergeable ones (a vocabulary mismatch, one model tied and one untied, a
missing shard, an index naming a file outside the folder) are refused by the engine and by `safemerge merge` in one
line, exit code 2, with nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from safemerge.cli import main as safemerge
from safemerge.errors import UserError
from safemerge.merges.engine import MergeEngine
from safemerge.merges.recipe import from_mergekit_yaml
from safemerge.weights import SAFETENSORS_INDEX
from safemerge.zoo.random_family import LlamaShape, write_random_family
from tests.conftest import report_figure
from tests.test_merges_mergekit import whole_tensor_cases

MERGEKIT = str(Path(sys.executable).parent / "mergekit-yaml")
EXPERTS = ("aligned", "medical")
ZERO_FLOOR = 1e-8  # see within_rounding
SHARD = 100_000  # bytes: 3 to 4 shards per fp32 model, 2 per bf16 model
PLAIN = LlamaShape(hidden=64, intermediate=128, layers=2, heads=4, vocab=256)
# Every readable format at once: Qwen2-shaped (q/k/v biases), 2 key-value heads for 4 query heads, tied.
ALL_FORMATS = LlamaShape(
    hidden=64, intermediate=128, layers=2, heads=4, vocab=256, kv_heads=2, tie_embeddings=True, attention_bias=True
)
FORMATS = {
    "sharded": (PLAIN, SHARD),
    "bfloat16": (LlamaShape(**{**vars(PLAIN), "dtype": "bfloat16"}), None),
    "float16": (LlamaShape(**{**vars(PLAIN), "dtype": "float16"}), None),
    "tied": (LlamaShape(**{**vars(PLAIN), "tie_embeddings": True}), None),
    "gqa": (LlamaShape(**{**vars(PLAIN), "kv_heads": 1}), None),
    "qwen2_biases": (LlamaShape(**{**vars(PLAIN), "attention_bias": True}), None),
}
RECIPES = {
    "task_arithmetic": {
        "merge_method": "task_arithmetic",
        "models": [{"weight": [0.3, 1.2]}, {"weight": 0.8}],
        "parameters": {"lambda": 0.9},
    },
    "ties": {
        "merge_method": "ties",
        "models": [{"weight": [0.6, 1.0], "density": 0.3}, {"weight": 0.8, "density": 0.6}],
        "parameters": {"normalize": True},
    },
    "slerp": {"merge_method": "slerp", "models": [], "parameters": {"t": [0.1, 0.9]}},
}


def family(work: Path, shape: LlamaShape, shard_size: int | None = None, **options) -> dict[str, Path]:
    return write_random_family(work, shape, EXPERTS, seed=0, shard_size=shard_size, **options)


def mergekit_config(folders: dict[str, Path], method: str, **dtypes: str) -> dict:
    """A mergekit YAML (as a dict) of RECIPES[method] over the family's folders; slerp runs base -> medical."""
    spec = RECIPES[method]
    if method == "slerp":
        models = [{"model": str(folders["base"])}, {"model": str(folders["medical"])}]
    else:
        models = [
            {"model": str(folders[name]), "parameters": parameters}
            for name, parameters in zip(EXPERTS, spec["models"], strict=True)
        ]
    return {
        "merge_method": method,
        "base_model": str(folders["base"]),
        "models": models,
        "parameters": spec["parameters"],
        **dtypes,
    }


def run_mergekit(config: dict, work: Path, name: str) -> Path:
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    out = work / f"{name}-mergekit"
    command = [MERGEKIT, str(path), str(out), "--no-cuda", "--quiet", "--no-copy-tokenizer", "--no-write-model-card"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def run_safemerge(config: dict, work: Path, name: str, *options: str) -> Path:
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    out = work / f"{name}-safemerge"
    assert safemerge(["merge", str(path), str(out), "--device", "cpu", *options]) == 0
    return out


def read_model(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def ordered(tensor: torch.Tensor) -> torch.Tensor:
    """A 16-bit float's bits as integers in the order of the values, so that the difference of two is their
    distance in ulps (adjacent representable values are 1 apart; +0 and -0 are both 0)."""
    bits = tensor.contiguous().view(torch.int16).to(torch.int32)
    return torch.where(bits < 0, -(bits & 0x7FFF), bits)


def ulps_apart(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """How many representable 16-bit values apart each pair is (0: equal, 1: neighbours)."""
    return (ordered(actual) - ordered(expected)).abs()


def within_rounding(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """Two fp32 results that differ by fp32 rounding, each rounded once to bf16: neighbours at most, or, where
    the result nearly cancels to zero (bf16 ulps far below fp32's rounding of the ~0.02 operands), within 1e-8."""
    near_zero = (actual.double() - expected.double()).abs() <= ZERO_FLOOR
    return (ulps_apart(actual, expected) <= 1) | near_zero


def magnitude_ulps(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """|difference| in bf16 ulps at the larger magnitude of the pair (2^(exponent - 7)), for reports: unlike the
    count of representable values between them it stays small for two tiny values of opposite sign."""
    larger = torch.maximum(actual.double().abs(), expected.double().abs())
    _, exponent = torch.frexp(larger)  # larger = m * 2^exponent, m in [0.5, 1)
    ulp = torch.pow(2.0, (exponent - 8).double())
    return torch.where(larger > 0, (actual.double() - expected.double()).abs() / ulp, torch.zeros_like(larger))


def tied_at_cut(folders: dict[str, Path], name: str, densities: dict[str, float]) -> torch.Tensor:
    """Where some expert's task vector has a magnitude equal to its TIES cut (the k-th largest): which of those
    tied elements is kept is a tie-break (safemerge: the earliest; mergekit: torch.argsort's order), frequent on
    bf16 inputs whose task vectors take few distinct values."""
    base = read_tensor(folders["base"], name).float()
    tied = torch.zeros(base.shape, dtype=torch.bool)
    for model, density in densities.items():
        magnitudes = (read_tensor(folders[model], name).float() - base).abs()
        count = max(1, int(density * magnitudes.numel()))
        cut = magnitudes.reshape(-1).topk(count).values[-1]
        tied |= magnitudes == cut
    return tied


def read_tensor(folder: Path, name: str) -> torch.Tensor:
    return read_model(folder)[name]


# --- the families' own formats ----------------------------------------------------------------------------------


def test_random_family_writes_each_format_as_transformers_reads_it(tmp_path):
    from transformers import AutoModelForCausalLM

    folders = family(tmp_path / "all", LlamaShape(**{**vars(ALL_FORMATS), "dtype": "bfloat16"}), SHARD)
    medical = folders["medical"]
    index = json.loads((medical / SAFETENSORS_INDEX).read_text())
    shards = sorted(medical.glob("model-*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == [path.name for path in shards]
    tensors = read_model(medical)
    assert sorted(index["weight_map"]) == sorted(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert "lm_head.weight" not in tensors and {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (2 * 16, 64)  # GQA: 2 heads of 16
    assert tensors["model.layers.1.self_attn.v_proj.bias"].shape == (32,)

    model = AutoModelForCausalLM.from_pretrained(medical)
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.dtype == torch.bfloat16
    state = model.state_dict()
    assert torch.equal(state["lm_head.weight"], tensors["model.embed_tokens.weight"])  # tied
    for name, tensor in tensors.items():
        assert torch.equal(state[name], tensor), name

    # The values depend on (seed, model, tensor) only: the same family unsharded holds the same tensors.
    single = family(tmp_path / "single", LlamaShape(**{**vars(ALL_FORMATS), "dtype": "bfloat16"}))
    assert (single["medical"] / "model.safetensors").is_file()
    same = read_model(single["medical"])
    assert all(torch.equal(same[name], tensor) for name, tensor in tensors.items())


def test_tokenizer_from_a_zoo_folder_needs_a_vocabulary_that_holds_it(tmp_path, zoo_dir):
    zoo_base = zoo_dir / "base"  # the session's zoo, wherever SAFEMERGE_ARTIFACTS puts it
    vocab = json.loads((zoo_base / "config.json").read_text())["vocab_size"]
    folders = family(tmp_path / "ok", LlamaShape(**{**vars(PLAIN), "vocab": vocab}), tokenizer_from=zoo_base)
    for file_name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (folders["medical"] / file_name).is_file(), file_name
    config = json.loads((folders["medical"] / "config.json").read_text())
    assert config["eos_token_id"] == json.loads((zoo_base / "config.json").read_text())["eos_token_id"]
    with pytest.raises(ValueError, match=f"{vocab} tokens .* vocabulary is 256"):
        family(tmp_path / "small", PLAIN, tokenizer_from=zoo_base)


# --- readable formats: the engine's merge ----------------------------------------------------------------------


@pytest.mark.parametrize("format_name", list(FORMATS))
def test_engine_merges_each_format_to_the_formula(format_name, tmp_path):
    """Task arithmetic by its formula (computed here in fp32 from the files, rounded once to the checkpoint's
    dtype), on a family that has one format each."""
    shape, shard_size = FORMATS[format_name]
    folders = family(tmp_path, shape, shard_size)
    engine = MergeEngine(folders["base"], {name: folders[name] for name in EXPERTS}, device="cpu")
    config = {
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "models": [
            {"model": "aligned", "parameters": {"weight": 0.3}},
            {"model": "medical", "parameters": {"weight": 0.8}},
        ],
        "parameters": {"lambda": 0.9},
    }
    merged = engine.merge(from_mergekit_yaml(yaml.safe_dump(config)))
    files = {name: read_model(folder) for name, folder in folders.items()}
    assert sorted(merged) == sorted(files["base"])
    for name, base in files["base"].items():
        base32 = base.float()
        aligned, medical = (files[model][name].float() - base32 for model in EXPERTS)
        expected = (base32 + 0.9 * (0.3 * aligned + 0.8 * medical)).to(base.dtype)
        assert merged[name].dtype == base.dtype, name
        if base.dtype == torch.float32:
            torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-7, msg=name)
        else:
            assert within_rounding(merged[name], expected).all(), name


@pytest.fixture(scope="module")
def fp32_family(tmp_path_factory) -> dict[str, Path]:
    return family(tmp_path_factory.mktemp("fp32-all-formats"), ALL_FORMATS, SHARD)


@pytest.fixture(scope="module")
def bf16_family(tmp_path_factory) -> dict[str, Path]:
    return family(
        tmp_path_factory.mktemp("bf16-all-formats"), LlamaShape(**{**vars(ALL_FORMATS), "dtype": "bfloat16"}), SHARD
    )


@pytest.fixture(scope="module")
def oracle(fp32_family, bf16_family, tmp_path_factory) -> dict[str, Path]:
    """Every mergekit-yaml output of the module, two runs at a time (each is mostly its own start-up): fp32-METHOD
    on the fp32 family; bf16-METHOD-fp32-compute (dtype float32, out_dtype bfloat16) and bf16-METHOD-bf16-compute
    (dtype bfloat16) on the bf16 family."""
    work = tmp_path_factory.mktemp("mergekit")
    configs = {}
    for method in RECIPES:
        configs[f"fp32-{method}"] = mergekit_config(fp32_family, method, dtype="float32")
        configs[f"bf16-{method}-fp32-compute"] = mergekit_config(
            bf16_family, method, dtype="float32", out_dtype="bfloat16"
        )
        configs[f"bf16-{method}-bf16-compute"] = mergekit_config(bf16_family, method, dtype="bfloat16")
    with ThreadPoolExecutor(max_workers=2) as pool:
        outputs = pool.map(lambda item: run_mergekit(item[1], work, item[0]), configs.items())
        return dict(zip(configs, outputs, strict=True))


@pytest.mark.parametrize("method", list(RECIPES))
def test_every_format_at_once_merges_to_mergekits_tensors(method, fp32_family, oracle, tmp_path):
    """fp32, Qwen2-shaped with biases, GQA, tied and sharded: `safemerge merge` writes mergekit-yaml's tensors
    (1e-5), keeps the embeddings tied and shards its output; transformers loads the folder."""
    from transformers import AutoModelForCausalLM

    config = mergekit_config(fp32_family, method, dtype="float32")
    expected = read_model(oracle[f"fp32-{method}"])
    out = run_safemerge(config, tmp_path, method, "--shard-size", "100KB")
    actual = read_model(out)
    assert sorted(actual) == sorted(expected) and "lm_head.weight" not in actual
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        torch.testing.assert_close(actual[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    assert (out / SAFETENSORS_INDEX).is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.config.tie_word_embeddings
    bias = "model.layers.1.self_attn.k_proj.bias"
    assert torch.equal(model.state_dict()[bias], actual[bias])


@pytest.mark.parametrize("method", list(RECIPES))
def test_bf16_family_matches_mergekit_within_bf16_rounding(method, bf16_family, oracle, tmp_path):
    """On bf16 inputs safemerge computes in fp32 and rounds once to bf16. Like with like, mergekit-yaml with
    `dtype: float32` (its compute dtype: inputs are upcast on load) and `out_dtype: bfloat16` does the same, so
    every element is within bf16 rounding of it (see within_rounding), except, for TIES, elements at a tie of the
    magnitude cut, where the two pick different tied elements. mergekit's `dtype: bfloat16` computes in bf16 (task
    arithmetic and TIES round after every operation; its SLERP upcasts to fp32 itself): reported, not asserted."""
    like = mergekit_config(bf16_family, method, dtype="float32", out_dtype="bfloat16")
    expected = read_model(oracle[f"bf16-{method}-fp32-compute"])
    actual = read_model(run_safemerge(like, tmp_path, method))
    # no dtype key: safemerge keeps the checkpoint's bf16, computing in fp32 all the same
    native = read_model(run_safemerge(mergekit_config(bf16_family, method), tmp_path, f"{method}-native"))
    in_bf16 = read_model(oracle[f"bf16-{method}-bf16-compute"])
    assert sorted(actual) == sorted(expected) == sorted(native) == sorted(in_bf16)
    # slerp's RECIPES entry lists no models: it has no cut
    densities = {
        model: entry.get("density", 1.0) for model, entry in zip(EXPERTS, RECIPES[method]["models"], strict=False)
    }
    elements = differing = tie_breaks = bf16_differing = 0
    worst = bf16_worst = 0.0
    for name, tensor in expected.items():
        assert actual[name].dtype == native[name].dtype == tensor.dtype == torch.bfloat16, name
        assert torch.equal(actual[name], native[name]), name
        rounding = within_rounding(actual[name], tensor)
        outside = ~rounding
        if method == "ties" and outside.any():
            tied = tied_at_cut(bf16_family, name, densities)
            tie_breaks += int((outside & tied).sum())
            outside &= ~tied
        assert not outside.any(), f"{name}: {int(outside.sum())} elements beyond bf16 rounding of mergekit-yaml"
        elements += tensor.numel()
        differing += int((ulps_apart(actual[name], tensor) > 0).sum())
        worst = max(worst, float(magnitude_ulps(actual[name], tensor)[rounding].max()))
        bf16_differing += int((ulps_apart(actual[name], in_bf16[name]) > 0).sum())
        bf16_worst = max(bf16_worst, float(magnitude_ulps(actual[name], in_bf16[name]).max()))
    assert (differing - tie_breaks) / elements < 0.01  # rounding flips are rare, not the rule
    report_figure(
        f"bf16 {method} against mergekit-yaml dtype float32 + out_dtype bfloat16: {differing}/{elements} elements "
        f"differ ({differing / elements:.3%}; {tie_breaks} of them TIES tie-breaks at the cut), the others at most "
        f"{worst:.2f} bf16 ulp; against mergekit-yaml dtype bfloat16 (bf16 compute): {bf16_differing / elements:.2%}"
        f" differ, up to {bf16_worst:.1f} ulp"
    )


# --- unmergeable formats: refused before any tensor is read -----------------------------------------------------


def _vocab_rows(tmp_path: Path) -> tuple[dict[str, Path], list[str]]:
    """The expert has 320 embedding rows but its config still says the base's 256."""
    folders = family(tmp_path / "family", PLAIN, vocab_sizes={"medical": 320})
    config = json.loads((folders["medical"] / "config.json").read_text())
    (folders["medical"] / "config.json").write_text(json.dumps({**config, "vocab_size": 256}))
    return folders, ["320 rows", "256 rows", "model.embed_tokens.weight", "vocab"]


def _vocab_both(tmp_path: Path) -> tuple[dict[str, Path], list[str]]:
    return family(tmp_path / "family", PLAIN, vocab_sizes={"medical": 320}), ["vocab_size 320", "vocab_size 256"]


def _tied_and_untied(tmp_path: Path) -> tuple[dict[str, Path], list[str]]:
    folders = family(tmp_path / "untied", PLAIN)
    tied = family(tmp_path / "tied", LlamaShape(**{**vars(PLAIN), "tie_embeddings": True}))
    return {**folders, "medical": tied["medical"]}, ["ties its output layer", "lm_head.weight", "untie"]


def _missing_shard(tmp_path: Path) -> tuple[dict[str, Path], list[str]]:
    folders = family(tmp_path / "family", PLAIN, SHARD)
    shard = sorted(folders["medical"].glob("model-*.safetensors"))[1]
    shard.unlink()
    return folders, [shard.name, "missing"]


def _index_outside(entry: str):
    def broken(tmp_path: Path) -> tuple[dict[str, Path], list[str]]:
        folders = family(tmp_path / "family", PLAIN, SHARD)
        index_path = folders["medical"] / SAFETENSORS_INDEX
        index = json.loads(index_path.read_text())
        first = sorted(set(index["weight_map"].values()))[0]
        # the named file exists (the base's shard of the same name): only its place is wrong
        target = entry.format(base=folders["base"], shard=first)
        index["weight_map"] = {name: target if file == first else file for name, file in index["weight_map"].items()}
        index_path.write_text(json.dumps(index))
        return folders, [target, SAFETENSORS_INDEX]

    return broken


REFUSALS = {
    "vocab_size_and_rows": _vocab_both,
    "embedding_rows": _vocab_rows,
    "tied_and_untied": _tied_and_untied,
    "missing_shard": _missing_shard,
    "index_parent_path": _index_outside("../base/{shard}"),
    "index_absolute_path": _index_outside("{base}/{shard}"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_unmergeable_format_is_refused_by_the_engine(case, tmp_path):
    folders, fragments = REFUSALS[case](tmp_path)
    with pytest.raises(UserError) as refused:
        MergeEngine(folders["base"], {"medical": folders["medical"]}, base_name="base", device="cpu")
    message = str(refused.value)
    assert "medical" in message and "\n" not in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    if case.startswith("vocab") or case == "embedding_rows":
        assert "base" in message and "shape" not in message  # the vocabulary, not the generic shape refusal


@pytest.mark.parametrize("case", list(REFUSALS))
def test_unmergeable_format_is_one_line_exit_2_nothing_written(case, tmp_path, capsys):
    folders, fragments = REFUSALS[case](tmp_path)
    config = tmp_path / "merge.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "merge_method": "ties",
                "base_model": str(folders["base"]),
                "models": [{"model": str(folders["medical"]), "parameters": {"weight": 0.5, "density": 0.5}}],
            }
        )
    )
    out = tmp_path / "out"
    code = safemerge(["merge", str(config), str(out), "--device", "cpu"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and len(error.splitlines()) == 1, error
    assert not out.exists()
    assert fragments[0] in error


@pytest.fixture(scope="module")
def three_expert_family(tmp_path_factory) -> dict[str, Path]:
    """Every readable format at once (GQA, q/k/v biases, tied, sharded), fp32, with three experts."""
    work = tmp_path_factory.mktemp("fp32-three-experts")
    return write_random_family(work, ALL_FORMATS, ("aligned", "medical", "finance"), seed=0, shard_size=SHARD)


@pytest.mark.parametrize("case", list(whole_tensor_cases("base", "aligned", "medical", "finance")))
def test_whole_tensor_methods_on_every_format_match_mergekit(case, three_expert_family, tmp_path):
    """multislerp, karcher, nearswap, arcee_fusion, sce and ram(plus_tl) on a GQA, biased, tied, sharded family:
    `safemerge merge` writes mergekit-yaml's tensors (1e-5)."""
    folders = [str(three_expert_family[name]) for name in ("base", "aligned", "medical", "finance")]
    config = whole_tensor_cases(*folders)[case]
    expected = read_model(run_mergekit(config, tmp_path, case))
    actual = read_model(run_safemerge(config, tmp_path, case, "--shard-size", "100KB"))
    assert sorted(actual) == sorted(expected) and "lm_head.weight" not in actual
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
