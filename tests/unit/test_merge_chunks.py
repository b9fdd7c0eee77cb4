"""The lean merge store's chunked paths: exact magnitude cuts over chunks (ties included), random streams that do
not depend on the chunking, and merges in small chunks equal to merges of whole tensors for every method."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from safemerge.merges.engine import (
    MergeEngine,
    chunk_ranges,
    fill_uniform,
    keep_mask,
    pack_mask,
    stream_seed,
    unpack_mask,
)
from safemerge.merges.methods import METHODS
from safemerge.merges.methods.cpu_kernels import della_keep, della_kept_bits, elect, unpack_product
from safemerge.merges.methods.selection import TopCut, sample_positions, top_cuts
from safemerge.merges.recipe import parse_recipe
from safemerge.zoo.random_family import LlamaShape, write_random_family


def top_cut(count: int, total: int, chunks, **where) -> TopCut:  # noqa: ANN001
    """The cut of one count, as the engine asks top_cuts for it."""
    return top_cuts([count], total, chunks, **where)[0]


def brute_force_top(magnitudes: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` largest elements, ties at the cut to the earliest: a stable sort by (-value, index)."""
    order = torch.sort(-magnitudes.reshape(-1).double(), stable=True).indices
    mask = torch.zeros(magnitudes.numel())
    mask[order[:count]] = 1.0
    return mask.view(magnitudes.shape)


def cut_mask(magnitudes: torch.Tensor, count: int, chunk_rows: int | None, sampled: bool = False) -> torch.Tensor:
    rows = magnitudes.shape[0]
    row = magnitudes[0].numel()
    flat = magnitudes.reshape(-1)
    if chunk_rows is None:
        cut = top_cut(count, magnitudes.numel(), lambda: iter(()), single=magnitudes)
        return cut.mask(magnitudes, 0, torch.empty_like(magnitudes))
    ranges = [(first * row, min(first + chunk_rows, rows) * row) for first in range(0, rows, chunk_rows)]
    sample = None
    if sampled:  # as the engine samples: every stride-th element, gathered chunk by chunk
        total = magnitudes.numel()
        pieces = [flat[start:end][sample_positions(start, end - start, total, samples=40)] for start, end in ranges]
        sample = np.sort(torch.cat(pieces).numpy())
    chunks = lambda: ((start, flat[start:end]) for start, end in ranges)  # noqa: E731
    cut = top_cut(count, magnitudes.numel(), chunks, sample=sample)
    mask = torch.empty_like(flat)
    for start, end in ranges:
        cut.mask(flat[start:end], start, mask[start:end])
    return mask.view(magnitudes.shape)


@pytest.mark.parametrize("shape", [(1,), (8,), (3, 7), (5, 64)])
def test_a_packed_mask_unpacks_to_itself(shape):
    mask = (torch.rand(shape, generator=torch.Generator().manual_seed(1)) < 0.4).float()
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-mask.numel() // 8)
    assert torch.equal(unpack_mask(packed, torch.full(shape, 7.0)), mask)


@pytest.mark.parametrize("shape", [(7, 50), (1, 33), (40,), (13, 1)])
@pytest.mark.parametrize("levels", [3, 100000])
def test_della_ranks_each_row_by_magnitude_with_ties_by_column(shape, levels):
    from safemerge.merges.methods.sparsify import _rank_norm

    generator = torch.Generator().manual_seed(levels)
    values = torch.randint(-levels, levels, shape, generator=generator).float() / levels
    rows = values.reshape(1, -1) if values.dim() < 2 else values
    # The reference: a stable sort by magnitude (ties to the lower column), inverted.
    expected = torch.sort(rows.abs(), dim=1, stable=True).indices.argsort(dim=1).float() / max(rows.shape[1] - 1, 1)
    ranks = _rank_norm(rows.abs(), torch.empty(rows.shape, dtype=torch.int64))
    assert torch.equal(ranks, expected)


@pytest.mark.parametrize("shape", [(7, 50), (1, 33), (40,), (300, 257), (16, 2048)])
@pytest.mark.parametrize("levels", [3, 100000, None, "zeros", "narrow", "bf16", "wide"])
@pytest.mark.parametrize("epsilon", [0.2, 0.0, -0.1])
def test_the_compiled_della_mask_keeps_where_the_draw_is_below_the_rank_probability(shape, levels, epsilon):
    from safemerge.merges.methods.sparsify import _rank_norm

    generator = torch.Generator().manual_seed(7)
    if levels is None:
        values = torch.randn(shape, generator=generator)
    elif levels == "zeros":  # unchanged rows: every magnitude tied at zero, ranked by column alone
        values = torch.zeros(shape)
        values.view(-1)[::7] = torch.randn(values.view(-1)[::7].shape, generator=generator)
        if values.dim() > 1:
            values[: values.shape[0] // 2] = 0.0
    elif levels == "narrow":  # distinct magnitudes within 1% of each other: neighbours differ in the last bits
        values = (1.0 + torch.rand(shape, generator=generator) * 0.01) * torch.randn(shape, generator=generator).sign()
    elif levels == "bf16":  # a bf16 fine-tune's task vector: few distinct magnitudes, many zeros, large tie groups
        base = torch.randn(shape, generator=generator).bfloat16()
        values = (base.float() + 0.003 * torch.randn(shape, generator=generator)).bfloat16().float() - base.float()
    elif levels == "wide":  # magnitudes over 40 octaves, denormals included: few per magnitude bucket
        octaves = torch.randint(0, 140, shape, generator=generator)
        values = torch.randn(shape, generator=generator) * torch.exp2(-octaves.float())
    else:  # tied magnitudes, which rank by column
        values = torch.randint(-levels, levels, shape, generator=generator).float() / levels
    rows = values.reshape(1, -1) if values.dim() < 2 else values
    density, start, seed = 0.6, 1234, stream_seed("s/t/m")

    def torch_mask(task: torch.Tensor) -> torch.Tensor:  # the torch ops' definition, which the GPU runs
        probability = _rank_norm(task.abs(), torch.empty(task.shape, dtype=torch.int64))
        probability.mul_(2 * epsilon).add_(density - epsilon)
        return (fill_uniform(torch.empty(task.shape), "s/t/m", start) < probability).float()

    # The kept values as torch's mask.mul_ makes them (signed zeros too), and their L1 norm.
    out = np.full(rows.shape, 7.0, dtype=np.float32)
    l1 = della_keep(rows.numpy(), density, epsilon, seed, start, out)
    kept = torch_mask(rows).mul_(rows)
    assert np.array_equal(out.view(np.int32), kept.numpy().view(np.int32))
    assert l1 == pytest.approx(float(kept.double().abs().sum()), rel=1e-6, abs=1e-30)
    # As bits, of the task vectors model - base subtracted row by row (a rescale's pass over a tensor in chunks):
    # pack_mask's bits of the torch mask, in parts of whole bytes (rows of 257 start mid-byte), and the kept norm.
    base = torch.randn(rows.shape, generator=generator)
    model = base + rows
    task = model - base
    mask = torch_mask(task)
    packed, l1 = della_kept_bits(model.numpy(), base.numpy(), density, epsilon, seed, start)
    assert np.array_equal(packed, pack_mask(mask).numpy())
    kept = mask.mul_(task)
    assert l1 == pytest.approx(float(kept.double().abs().sum()), rel=1e-6, abs=1e-30)
    # And back: the bits times the task vector are the mask's product, signed zeros too.
    product = unpack_product(task.reshape(-1).numpy(), packed, np.full(task.numel(), 7.0, dtype=np.float32))
    assert np.array_equal(product.view(np.int32), kept.reshape(-1).numpy().view(np.int32))


@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize("chunk_rows", [None, 1, 3, 7])
@pytest.mark.parametrize("levels", [3, 50, 100000])
def test_cuts_keep_exactly_the_largest_with_ties_to_the_earliest(chunk_rows, levels, sampled):
    if sampled and chunk_rows is None:
        pytest.skip("a tensor in one chunk is cut in memory")
    generator = torch.Generator().manual_seed(levels)
    # Few distinct levels make ties at the cut the rule rather than the exception; zeros are among them.
    magnitudes = torch.randint(0, levels, (20, 13), generator=generator).float() * 0.37
    for count in (0, 1, 17, 130, 259, 260, 300):
        expected = brute_force_top(magnitudes, min(count, magnitudes.numel()))
        got = cut_mask(magnitudes, count, chunk_rows, sampled)
        kept_values = (got * magnitudes).sum()
        assert float(kept_values) == pytest.approx(float((expected * magnitudes).sum())), count
        nonzero = magnitudes != 0  # which zeros are kept changes nothing a kernel computes
        assert torch.equal(got[nonzero], expected[nonzero]), (count, chunk_rows)


@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize("chunk_rows", [None, 1, 7])
@pytest.mark.parametrize("levels", [3, 100000])
def test_one_selection_of_several_counts_gives_each_count_its_own_cut(chunk_rows, levels, sampled):
    if sampled and chunk_rows is None:
        pytest.skip("a tensor in one chunk is cut in memory")
    generator = torch.Generator().manual_seed(levels)
    magnitudes = torch.randint(0, levels, (200, 13), generator=generator).float() * 0.37
    flat, total, row = magnitudes.reshape(-1), magnitudes.numel(), magnitudes.shape[1]
    ranges = [(first * row, min(first + (chunk_rows or 200), 200) * row) for first in range(0, 200, chunk_rows or 200)]
    passes = []

    def chunks():
        passes.append(1)
        return ((start, flat[start:end]) for start, end in ranges)

    single = magnitudes if chunk_rows is None else None
    sample = np.sort(flat[:: total // 400].numpy()) if sampled else None
    counts = [0, 1, 17, 1300, 2599, 2600, 3000, 17, 1950]
    cuts = top_cuts(counts, total, chunks, single=single, sample=sample)
    together = len(passes)
    for count, cut in zip(counts, cuts, strict=True):
        passes.clear()
        assert cut == top_cut(count, total, chunks, single=single, sample=sample), count
    # The passes of one count serve them all: a bracket pass, then two radix histograms and a ties pass for the
    # counts it missed (few levels make the brackets single values).
    assert together <= 4


@pytest.mark.parametrize("chunk_rows", [None, 1, 3, 7])
@pytest.mark.parametrize("levels", [3, 50, 100000])
def test_a_cut_sparsifies_as_its_mask_times_the_vector(chunk_rows, levels):
    generator = torch.Generator().manual_seed(levels)
    signs = torch.randint(0, 2, (20, 13), generator=generator).float() * 2 - 1
    vector = torch.randint(0, levels, (20, 13), generator=generator).float() * 0.37 * signs
    magnitudes, flat, row = vector.abs(), vector.reshape(-1), vector.shape[1]
    ranges = (
        [(0, flat.numel())]
        if chunk_rows is None
        else [
            (first * row, min(first + chunk_rows, vector.shape[0]) * row)
            for first in range(0, vector.shape[0], chunk_rows)
        ]
    )
    chunks = lambda: ((start, magnitudes.reshape(-1)[start:end]) for start, end in ranges)  # noqa: E731
    for count in (0, 1, 17, 130, 259, 260, 300):
        single = magnitudes if chunk_rows is None else None
        cut = top_cut(count, flat.numel(), chunks, single=single)
        for start, end in ranges:
            piece = flat[start:end]
            expected = cut.mask(piece.abs(), start, torch.empty_like(piece)) * piece
            assert torch.equal(cut.sparsify(piece, start, torch.full_like(piece, 9.0)), expected), (count, start)


@pytest.mark.parametrize("draw", [fill_uniform, lambda buffer, key, start=0: keep_mask(buffer, 0.3, key, start)])
def test_random_streams_do_not_depend_on_where_a_chunk_starts(draw):
    whole = draw(torch.empty(2_200_003), "seed/tensor/model")
    for start in (0, 1, 2, 3, 5, (1 << 20) - 1, 1 << 20, (1 << 20) + 3, 2_100_001):
        part = draw(torch.empty(99_991), "seed/tensor/model", start)
        assert torch.equal(part, whole[start : start + part.numel()]), start


def test_random_draws_are_uniform_and_a_mask_keeps_where_its_draw_is_below_the_probability():
    draws = fill_uniform(torch.empty(1_000_003), "seed/tensor/model", start=12_345)
    expected = draws.numel() / 16
    chi_square = float(((torch.histc(draws, bins=16, min=0, max=1) - expected) ** 2 / expected).sum())
    assert chi_square < 45, chi_square  # 15 degrees of freedom: a fair draw exceeds 45 with p < 1e-4
    assert float(draws.min()) >= 0 and float(draws.max()) < 1
    for probability in (0.3, 0.5, 0.9):
        mask = keep_mask(torch.empty(1_000_003), probability, "seed/tensor/model", start=12_345)
        assert torch.equal(mask, (draws < probability).float()), probability
    assert not torch.equal(draws, fill_uniform(torch.empty(1_000_003), "seed/tensor/other", start=12_345))


def test_chunks_are_blocks_of_whole_rows():
    assert chunk_ranges((10, 4), chunk_elements=12) == [(0, 12), (12, 24), (24, 36), (36, 40)]
    assert chunk_ranges((10, 4), chunk_elements=3) == [(start, start + 4) for start in range(0, 40, 4)]
    assert chunk_ranges((1000,), chunk_elements=3) == [(0, 1000)]


SHAPE = LlamaShape(hidden=64, intermediate=96, layers=2, heads=4, vocab=300)


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> tuple[MergeEngine, MergeEngine]:
    family = write_random_family(tmp_path_factory.mktemp("family"), SHAPE, ("aligned", "medical"))
    experts = {name: family[name] for name in ("aligned", "medical")}
    return MergeEngine(family["base"], experts, device="cpu"), MergeEngine(
        family["base"], experts, device="cpu", chunk_elements=500
    )


def recipe_for(method: str, rescale: bool) -> dict:
    row = METHODS[method]
    names = [param.name for param in row.params]
    per_model_names = {param.name for param in row.params if param.per_model}
    models = ["aligned", "medical"][: row.max_models or 2]
    if method == "slerp":
        return {
            "merge_method": method,
            "base_model": "base",
            "models": [{"model": "medical"}],
            "parameters": {"t": 0.3},
        }
    per_model = {"weight": 0.7, "density": 0.4, "gamma": 0.05, "epsilon": 0.1}
    recipe = {
        "merge_method": method,
        "models": [
            {"model": model, "parameters": {k: v for k, v in per_model.items() if k in per_model_names}}
            for model in models
        ],
        "parameters": {key: True for key in ("nuslerp_row_wise", "filter_wise") if key in names},
        "seed": 3,
    }
    # nearswap's distance, SCE's selected share and RAM's change threshold at values that keep some and drop some
    shared_names = {param.name for param in row.params if not param.per_model}
    shared = {"t": 0.002, "select_topk": 0.5, "epsilon": 2e-3}
    recipe["parameters"].update({key: value for key, value in shared.items() if key in shared_names})
    if "rescale" in names:
        recipe["parameters"]["rescale"] = rescale
    if row.base != "input":
        recipe["base_model"] = "base"
    if row.role_weights or row.needs_alignment:
        recipe["alignment_model"] = "aligned"
    if row.role_weights:
        recipe["models"] = [{"model": model} for model in models]
    return recipe


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_merge_in_small_chunks_is_the_merge_of_whole_tensors(engines, method, rescale):
    whole, chunked = engines
    assert len(chunked._chunks["model.embed_tokens.weight"]) > 1
    raw = recipe_for(method, rescale)
    if rescale and "rescale" not in raw["parameters"]:
        pytest.skip(f"{method} has no rescale parameter")
    recipe = parse_recipe(raw)
    expected, got = whole.merge(recipe), chunked.merge(recipe)
    # Exact, except where a whole-tensor sum (rescale norms, row-wise dot products, multislerp's gram, SCE's mean
    # squares) is added in another order: then within fp32 rounding of weights of size 0.02.
    # karcher's norms come from the engine's dot products, which the chunked engine sums chunk by chunk: equal to
    # the last bit on some CPUs, one ulp off on others (float64 sums in another order).
    summed_in_chunks = rescale or method in ("nuslerp", "multislerp", "karcher", "sce", "safety_vector")
    for name, tensor in expected.items():
        if summed_in_chunks:
            torch.testing.assert_close(got[name], tensor, rtol=2e-6, atol=1e-7)
        else:
            assert torch.equal(got[name], tensor), name


def test_a_large_tensor_in_one_chunk_is_cut_through_a_sampled_bracket(monkeypatch):
    from safemerge.merges.methods import selection

    def no_partition(*_):
        raise AssertionError("the bracket missed the cut and fell back to partitioning the tensor")

    monkeypatch.setattr(selection, "_cuts_in_memory", no_partition)
    generator = torch.Generator().manual_seed(11)
    magnitudes = torch.randint(0, 20000, (2000, 50), generator=generator).float() * 0.37  # ties, and zeros
    counts = [1, 1000, 50000, 99999, 50000]
    cuts = selection.top_cuts(counts, magnitudes.numel(), lambda: iter(()), single=magnitudes)
    for count, cut in zip(counts, cuts, strict=True):
        mask = cut.mask(magnitudes, 0, torch.empty_like(magnitudes))
        nonzero = magnitudes != 0
        assert torch.equal(mask[nonzero], brute_force_top(magnitudes, count)[nonzero]), count


@pytest.mark.parametrize("count", [1, 1000, 50000, 99999])
def test_a_sampled_bracket_finds_the_exact_cut_in_one_pass(monkeypatch, count):
    from safemerge.merges.methods import selection

    def no_radix(*_):
        raise AssertionError("the bracket missed the cut and fell back to the radix select")

    monkeypatch.setattr(selection, "_cuts_by_radix", no_radix)
    generator = torch.Generator().manual_seed(count)
    magnitudes = torch.randint(0, 20000, (2000, 50), generator=generator).float() * 0.37  # ties, and zeros
    flat, total = magnitudes.reshape(-1), magnitudes.numel()
    ranges = [(start, min(start + 7500, total)) for start in range(0, total, 7500)]
    pieces = [flat[start:end][sample_positions(start, end - start, total)] for start, end in ranges]
    cut = top_cut(count, total, lambda: ((s, flat[s:e]) for s, e in ranges), sample=np.sort(torch.cat(pieces).numpy()))
    mask = torch.empty_like(flat)
    for start, end in ranges:
        cut.mask(flat[start:end], start, mask[start:end])
    expected = brute_force_top(flat, count)
    assert torch.equal(mask[flat != 0], expected[flat != 0])


ELECTING = sorted(name for name, row in METHODS.items() if getattr(row.kernel, "consensus", "none") != "none")


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("weights", [(0.7, 0.4), (0.9, -0.4)])
@pytest.mark.parametrize("method", ELECTING)
def test_the_compiled_sign_election_is_the_torch_ops_election(engines, monkeypatch, method, weights, normalize):
    from safemerge.merges.methods import cpu_kernels, task_arithmetic

    chunked = engines[1]
    calls = []
    monkeypatch.setattr(cpu_kernels, "elect", lambda *args: calls.append(1) or elect(*args))
    raw = recipe_for(method, rescale=True)  # rescaled where the method rescales
    for entry, weight in zip(raw["models"], weights, strict=True):
        entry["parameters"]["weight"] = weight
    raw["parameters"]["normalize"] = normalize
    recipe = parse_recipe(raw)
    fused = chunked.merge(recipe)
    assert calls, "the compiled election did not run"
    monkeypatch.setattr(task_arithmetic, "_fusable", lambda *_: False)
    reference = chunked.merge(recipe)
    for name, tensor in reference.items():
        # The same float32 operations in the same order; torch's vectorized addcmul may fuse a multiply-add.
        torch.testing.assert_close(fused[name], tensor, rtol=1e-6, atol=1e-7, msg=name)
    assert not torch.equal(fused["model.embed_tokens.weight"], chunked.base_tensor("model.embed_tokens.weight"))


COMPILED = ("dare_linear", "dare_ties", "della", "della_linear", "ram", "ramplus_tl", "sce")


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("method", COMPILED)
def test_the_compiled_drops_ram_and_variance_are_the_torch_ops(engines, monkeypatch, method, rescale):
    from safemerge.merges.methods import cpu_kernels

    raw = recipe_for(method, rescale)
    if rescale and "rescale" not in raw["parameters"]:
        pytest.skip(f"{method} has no rescale parameter")
    recipe = parse_recipe(raw)
    for engine in engines:  # whole tensors, and tensors in chunks (which a rescale passes over twice)
        calls = []
        for name in ("keep_values", "della_keep", "ram", "variance", "sce_merge", "masked_squares", "ram_counts"):
            kernel = getattr(cpu_kernels, name)
            counted = lambda *args, kernel=kernel, calls=calls, **kw: calls.append(1) or kernel(*args, **kw)  # noqa: E731
            monkeypatch.setattr(cpu_kernels, name, counted)
        compiled = engine.merge(recipe)
        assert calls, "no compiled loop ran"
        monkeypatch.setattr(cpu_kernels, "compiled", lambda *_: False)
        reference = engine.merge(recipe)
        monkeypatch.undo()
        for name, tensor in reference.items():
            # The same draws and float32 operations; the election's torch ops may fuse a multiply-add.
            torch.testing.assert_close(compiled[name], tensor, rtol=1e-6, atol=1e-7, msg=name)
        assert not torch.equal(compiled["model.embed_tokens.weight"], engine.base_tensor("model.embed_tokens.weight"))


@pytest.mark.parametrize(("method", "compiled"), [("della", True), ("della", False), ("dare_ties", False)])
def test_a_rescaled_merge_in_chunks_draws_each_random_mask_once(engines, monkeypatch, method, compiled):
    """The norm pass records the masks it draws and the merge pass reads them, from the first chunk on. (The
    compiled DARE loops redraw instead: a draw costs less than recording it.)"""
    from safemerge.merges import engine as engine_module
    from safemerge.merges.methods import cpu_kernels

    chunked = engines[1]
    drawn = []
    elements_of = lambda first: first.numel() if isinstance(first, torch.Tensor) else first.size  # noqa: E731
    if compiled:
        counted = {"della_keep": cpu_kernels, "della_kept_bits": cpu_kernels}
    else:
        counted = {"fill_uniform": engine_module, "keep_mask": engine_module}
        monkeypatch.setattr(cpu_kernels, "compiled", lambda *_: False)
    for name, module in counted.items():
        kernel = getattr(module, name)
        monkeypatch.setattr(
            module,
            name,
            lambda first, *a, kernel=kernel, **kw: drawn.append(elements_of(first)) or kernel(first, *a, **kw),
        )
    chunked.merge(parse_recipe(recipe_for(method, rescale=True)))
    monkeypatch.undo()
    elements = sum(chunked.shapes[name].numel() for name in chunked.float_names)
    assert sum(drawn) == 2 * elements  # each element of each of the 2 models' task vectors, once


@pytest.mark.parametrize("start", [0, 12_345])
def test_the_kept_l1_is_the_l1_of_the_kept_values(start):
    from safemerge.merges.methods.cpu_kernels import keep, keep_values, kept_l1
    from safemerge.merges.methods.inputs import chunked_l1

    generator = torch.Generator().manual_seed(3)
    base = torch.randn(300_007, generator=generator)
    model = base + 0.01 * torch.randn(300_007, generator=generator)
    values = model - base  # the task vector kept_l1 takes as model and base
    kept, mask = torch.empty_like(values), torch.empty_like(values)
    summed = keep_values(values.numpy(), 0.3, 99, start, kept.numpy())
    keep(mask.numpy(), 0.3, 99, start)  # the same draws as a 0/1 mask: kept is the torch ops' mask.mul_, bit for bit
    assert torch.equal(kept.view(torch.int32), mask.mul_(values).view(torch.int32))
    expected = chunked_l1(kept)
    assert 0.25 * chunked_l1(values) < expected < 0.35 * chunked_l1(values)
    assert summed == pytest.approx(expected, rel=1e-6)  # summed on the way
    assert kept_l1(model.numpy(), base.numpy(), 0.3, 99, start) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("models", [1, 2, 3, 4])
def test_the_compiled_variance_is_torch_var_bit_for_bit(models):
    from safemerge.merges.methods.cpu_kernels import variance

    generator = torch.Generator().manual_seed(models)
    base = torch.randn(100_003, generator=generator)
    own = [base + torch.randn(100_003, generator=generator) * 10.0**-exponent for exponent in range(models)]
    out = torch.empty(100_003)
    variance([tensor.numpy() for tensor in own], base.numpy(), out.numpy())
    vectors = [tensor - base for tensor in own]  # the task vectors, as the engine subtracts them
    assert torch.equal(out, torch.var(torch.stack(vectors), dim=0, unbiased=False))


def test_a_count_vote_election_is_the_torch_ops_election():
    generator = torch.Generator().manual_seed(5)
    base = torch.randn(70_001, generator=generator)
    deltas = [torch.randn(70_001, generator=generator) * (torch.rand(70_001, generator=generator) < 0.5) for _ in "abc"]
    weights, coefficients = [0.5, -0.25, 0.75], [0.6, -0.3, 0.9]
    out = torch.empty_like(base)
    elect(base.numpy(), [d.numpy() for d in deltas], coefficients, weights, 0.8, True, True, out.numpy())
    votes = sum(torch.sign(delta) * math.copysign(1.0, weight) for delta, weight in zip(deltas, weights, strict=True))
    majority = torch.copysign(torch.ones(()), votes)
    agrees = [
        torch.sign(delta) * math.copysign(1.0, weight) == majority
        for delta, weight in zip(deltas, weights, strict=True)
    ]
    mixed = sum(delta * c * a for delta, c, a in zip(deltas, coefficients, agrees, strict=True))
    divisor = sum(a * w for a, w in zip(agrees, weights, strict=True))
    expected = base + 0.8 * mixed / torch.where(divisor == 0, torch.ones(()), divisor)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("chunk_elements", [None, 500])
def test_arcee_fusions_kept_figures_belong_to_the_model_pair_merged(tmp_path, chunk_elements):
    """arcee_fusion keeps each tensor's quartiles and row divergences across merges (they depend on the weights
    alone): merging one expert, the other, then the first again gives each time what a fresh engine gives."""
    family = write_random_family(tmp_path, SHAPE, ("aligned", "medical"))
    experts = {name: family[name] for name in ("aligned", "medical")}
    sizes = {} if chunk_elements is None else {"chunk_elements": chunk_elements}
    engine = MergeEngine(family["base"], experts, device="cpu", **sizes)

    def recipe(model: str):  # noqa: ANN202
        return parse_recipe({"merge_method": "arcee_fusion", "base_model": "base", "models": [{"model": model}]})

    merged = {model: engine.merge(recipe(model)) for model in ("aligned", "medical")}
    again = engine.merge(recipe("aligned"))
    assert engine._lasting_cuts and engine._lasting_values, "nothing was kept across merges"
    for model in ("aligned", "medical"):
        fresh = MergeEngine(family["base"], experts, device="cpu", **sizes).merge(recipe(model))
        for name, tensor in fresh.items():
            assert torch.equal(merged[model][name], tensor), (model, name)
            if model == "aligned":
                assert torch.equal(again[name], tensor), name
    assert any(not torch.equal(merged["aligned"][name], merged["medical"][name]) for name in fresh)


@pytest.mark.parametrize("chunk_elements", [None, 500])
def test_sces_kept_counts_and_samples_belong_to_the_models_merged(tmp_path, chunk_elements):
    """SCE keeps each tensor's count of varying elements and a sample of its variances across merges (they depend
    on the models' weights alone): merges of other shares and of the models in another order, and the first
    again, each give what a fresh engine gives."""
    family = write_random_family(tmp_path, SHAPE, ("aligned", "medical"))
    experts = {name: family[name] for name in ("aligned", "medical")}
    sizes = {} if chunk_elements is None else {"chunk_elements": chunk_elements}
    engine = MergeEngine(family["base"], experts, device="cpu", **sizes)

    def recipe(models: tuple[str, ...], share: float):  # noqa: ANN202
        listed = [{"model": model} for model in models]
        parameters = {"select_topk": share}
        return parse_recipe({"merge_method": "sce", "base_model": "base", "models": listed, "parameters": parameters})

    plans = [(("aligned", "medical"), 0.3), (("aligned", "medical"), 0.7), (("medical", "aligned"), 0.3)]
    plans.append((("aligned",), 0.5))  # one model varies nowhere: nothing is selected
    merged = [engine.merge(recipe(*plan)) for plan in [*plans, plans[0]]]
    assert engine._lasting_values, "nothing was kept across merges"
    if chunk_elements is not None:
        assert any(isinstance(key, str) for _, key in engine._samples), "no sample of the variances was kept"
    for plan, got in zip([*plans, plans[0]], merged, strict=True):
        fresh = MergeEngine(family["base"], experts, device="cpu", **sizes).merge(recipe(*plan))
        for name, tensor in fresh.items():
            assert torch.equal(got[name], tensor), (plan, name)
    assert any(not torch.equal(merged[0][name], merged[1][name]) for name in fresh)


@pytest.mark.parametrize("kind", ["normal", "ties", "zeros", "wide", "one"])
def test_order_statistics_are_the_sorted_values_with_their_ties(kind):
    from safemerge.merges.methods.cpu_kernels import order_statistics

    generator = torch.Generator().manual_seed(11)
    size = 200_003
    if kind == "normal":
        values = torch.randn(size, generator=generator).abs()
    elif kind == "ties":  # a bf16 task vector's few distinct magnitudes
        values = (torch.randn(size, generator=generator) * 0.01).bfloat16().float().abs()
    elif kind == "zeros":
        values = torch.zeros(size)
        values[::5] = torch.rand(values[::5].shape, generator=generator)
    elif kind == "wide":  # denormals to large values: top bins far apart
        octaves = torch.randint(-140, 60, (size,), generator=generator).float()
        values = torch.rand(size, generator=generator) * torch.exp2(octaves)
    else:
        values = torch.full((size,), 0.25)
    ascending = torch.sort(values).values
    positions = [0, 1, size // 3, size // 2, size - 2, size - 1]
    found = order_statistics(values.numpy(), positions)
    for position in positions:
        value = ascending[position]
        expected = (float(value), int((values > value).sum()), int((values == value).sum()))
        assert found[position] == expected, (kind, position)
