"""The merge's hot loops on the CPU, compiled with numba: a counter-based random draw, TIES's sign election with
its disjoint merge in one pass over the elements, and the scan of a magnitude cut's bracket; and the thread pool
they and the merge's numpy work run on.

Why numba: the same steps as torch ops take one pass over memory per op (a DARE-TIES merge of two task vectors is
about 20 of them per element) and torch's CPU generator is serial; compiled loops take one pass and vectorize.
Each loop is serial and releases the GIL, and `in_parts` runs it on the merge's thread pool over consecutive parts
of the elements, so numba's own threading layer (which must not be entered from two threads at once) is not used.
Compiled code is cached on disk (numba's `cache=True`), so a process pays the compile once per machine.

The torch ops in merges/methods stay the reference (and the GPU path); tests compare the two on the CPU."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numba
import numpy as np
import torch

# One pool, a thread per torch CPU thread, for the compiled loops and the numpy work of the merge (della's row
# sorts, a cut's selection): both release the GIL, and run each call on one core.
CPU_THREADS = max(1, torch.get_num_threads())
cpu_pool = ThreadPoolExecutor(max_workers=CPU_THREADS)
_PARALLEL_ELEMENTS = 1 << 16  # below this a loop is not worth splitting across the pool
Result = TypeVar("Result")

# splitmix64 (Steele, Lea and Flood 2014): element k of a stream is mix(seed + (k + 1) * golden), so any element is
# drawn without the ones before it, and a tensor's stream does not depend on how its chunks are cut.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S27, _S30, _S31 = np.uint64(27), np.uint64(30), np.uint64(31)
UNIFORM_BITS = 24  # a float32 in [0, 1) holds 24 random bits exactly: a draw is the hash's top 24 bits
_TOP = np.uint64(64 - UNIFORM_BITS)
_UNIT = np.float32(2.0**-UNIFORM_BITS)  # a draw k is the uniform k * 2**-24


@numba.njit(nogil=True, cache=True, inline="always")
def _draw(seed: np.uint64, index: int) -> np.uint64:
    """The top UNIFORM_BITS bits of element `index`'s 64-bit hash."""
    z = seed + (np.uint64(index) + np.uint64(1)) * _GOLDEN
    z = (z ^ (z >> _S30)) * _MIX1
    z = (z ^ (z >> _S27)) * _MIX2
    return (z ^ (z >> _S31)) >> _TOP


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _uniform(out: np.ndarray, seed: np.uint64, start: int) -> None:
    for i in range(out.size):
        out[i] = np.float32(_draw(seed, start + i)) * _UNIT


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _keep(out: np.ndarray, seed: np.uint64, start: int, threshold: np.uint64) -> None:
    for i in range(out.size):
        out[i] = np.float32(_draw(seed, start + i) < threshold)


def in_parts(size: int, work: Callable[[int, int], Result], unit: int = 1) -> list[tuple[int, Result]]:
    """(first, work(first, last)) over consecutive parts [first, last) of range(size), one part per pool thread
    (`unit`: elements per index, e.g. a row's, which decide whether splitting is worth it)."""
    if CPU_THREADS == 1 or size < 2 or size * unit < _PARALLEL_ELEMENTS:
        return [(0, work(0, size))]
    step = -(-size // CPU_THREADS)
    firsts = range(0, size, step)
    return list(zip(firsts, cpu_pool.map(lambda first: work(first, min(first + step, size)), firsts), strict=True))


def _sliced(kernel: Callable[..., object], arrays: list[np.ndarray], *fixed: object) -> None:
    """kernel(*(array[first:last] for array in arrays), *fixed) on the pool's consecutive parts of the arrays (all
    of one length): the compiled loops take their per-element arrays first and their scalars after."""
    in_parts(arrays[0].size, lambda first, last: kernel(*(array[first:last] for array in arrays), *fixed))


def _slots(deltas: list[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray]:
    """The deltas in a compiled loop's FUSED_VECTORS slots, and which slots hold one: an unused slot repeats the
    first delta (in cache, so it costs no memory traffic)."""
    padding = FUSED_VECTORS - len(deltas)
    return [*deltas, *[deltas[0]] * padding], np.array([True] * len(deltas) + [False] * padding)


def _per_slot(values: list[float], fill: float = 0.0) -> np.ndarray:
    """One float32 value per slot, `fill` in the unused ones."""
    return np.array([*values, *[fill] * (FUSED_VECTORS - len(values))], dtype=np.float32)


def uniform(out: np.ndarray, seed: int, start: int) -> None:
    """out (flat float32) = elements [start, start + size) of the stream `seed`, each k * 2**-24 for a uniform
    24-bit k: U[0, 1) exactly as fine as float32 holds it."""
    key = np.uint64(seed)
    in_parts(out.size, lambda first, last: _uniform(out[first:last], key, start + first))


def _threshold(probability: float) -> np.uint64:
    """A draw k (a 24-bit integer) is below `probability` where k < this."""
    return np.uint64(round(probability * (1 << UNIFORM_BITS)))


def keep(out: np.ndarray, probability: float, seed: int, start: int) -> None:
    """out (flat float32) = 1.0 where the element of stream `seed` is kept, else 0.0: kept when its uniform draw
    is below `probability` (to 2**-24), the same draws `uniform` gives."""
    key, threshold = np.uint64(seed), _threshold(probability)
    in_parts(out.size, lambda first, last: _keep(out[first:last], key, start + first, threshold))


_L1_BLOCK = 1 << 12  # elements summed in float32 before the block's sum is added in float64


@numba.njit(nogil=True, cache=True, error_model="numpy", fastmath={"reassoc"})
def _keep_values(values: np.ndarray, seed: np.uint64, start: int, threshold: np.uint64, out: np.ndarray) -> float:
    # Blocks of _L1_BLOCK counted from 0 over slices, as in _kept_l1: reassoc vectorizes the float32 block sums.
    # The value times its draw's 0/1 (torch's mask.mul_, signed zeros included): as a select on the 64-bit draw's
    # comparison the loop ran 3x slower here (0.86 against 0.25 ns per element on one core).
    total = 0.0
    for first in range(0, out.size, _L1_BLOCK):
        block = np.float32(0.0)
        own, kept, offset = values[first : first + _L1_BLOCK], out[first : first + _L1_BLOCK], start + first
        for i in range(own.size):
            value = own[i] * np.float32(_draw(seed, offset + i) < threshold)
            kept[i] = value
            block += abs(value)
        total += np.float64(block)
    return total


def keep_values(values: np.ndarray, probability: float, seed: int, start: int, out: np.ndarray) -> float:
    """DARE's drop in one pass: out (flat float32) = values times `keep`'s 0.0 or 1.0 (the same draws), as the
    torch ops' mask.mul_ makes it, without writing the mask; returns out's L1 norm, summed on the way (a rescale's
    norm). Its draws are redrawn, not recorded, where a tensor needs them twice."""
    key, threshold = np.uint64(seed), _threshold(probability)

    def loop(first: int, last: int) -> float:
        return _keep_values(values[first:last], key, start + first, threshold, out[first:last])

    return sum(total for _, total in in_parts(out.size, loop))


@numba.njit(nogil=True, cache=True, error_model="numpy", fastmath={"reassoc", "nsz"})
def _kept_l1(model: np.ndarray, base: np.ndarray, seed: np.uint64, start: int, threshold: np.uint64) -> float:
    # reassoc lets the float32 block sums vectorize: the L1 norm is accurate to ~1e-7 relative in any order. The
    # inner loop counts from 0 over slices: with range(first, min(...)) numba's loop did not vectorize (4x slower).
    total = 0.0
    for first in range(0, model.size, _L1_BLOCK):
        block = np.float32(0.0)
        own, reference, offset = model[first : first + _L1_BLOCK], base[first : first + _L1_BLOCK], start + first
        for i in range(own.size):  # times the draw's 0/1, as in _keep_values (a select ran 3x slower)
            block += abs(own[i] - reference[i]) * np.float32(_draw(seed, offset + i) < threshold)
        total += np.float64(block)
    return total


def kept_l1(model: np.ndarray, base: np.ndarray, probability: float, seed: int, start: int) -> float:
    """The L1 norm of keep_values' result on the task vector model - base (the same draws, the same float32
    subtraction) in one pass that writes nothing: a DARE rescale's norm of a tensor merged in chunks, taken
    before its merge pass."""
    key, threshold = np.uint64(seed), _threshold(probability)

    def loop(first: int, last: int) -> float:
        return _kept_l1(model[first:last], base[first:last], key, start + first, threshold)

    return sum(total for _, total in in_parts(model.size, loop))


def compiled(*tensors: torch.Tensor) -> bool:
    """Whether the compiled loops here take these tensors: contiguous float32 on the CPU (elsewhere, a GPU, the
    torch ops run)."""
    return all(
        tensor.device.type == "cpu" and tensor.dtype == torch.float32 and tensor.is_contiguous() for tensor in tensors
    )


def fusable(vectors: list[torch.Tensor], *others: torch.Tensor) -> bool:
    """Whether a loop over several models' vectors takes them (at most FUSED_VECTORS, in its slots) with `others`."""
    return len(vectors) <= FUSED_VECTORS and compiled(*vectors, *others)


def flat(tensor: torch.Tensor) -> np.ndarray:
    """A contiguous CPU tensor as the flat numpy array the compiled loops take (a view: no copy)."""
    return tensor.view(-1).numpy()


FUSED_VECTORS = 4  # task vectors the fused election takes (unused slots repeat the first with weight 0)


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _elect(base, d0, d1, d2, d3, out, terms, votes, signed, signs, weights, scale, floor):  # noqa: ANN001
    # Branch-free, so the loop vectorizes: a vector's vote is delta * votes[i] + sign(delta) * signed[i] (one of the
    # two is zero), and without normalize the weights are zero, so the divisor is `floor`, 1.
    zero, one = np.float32(0.0), np.float32(1.0)
    c0, c1, c2, c3 = terms[0], terms[1], terms[2], terms[3]
    v0, v1, v2, v3 = votes[0], votes[1], votes[2], votes[3]
    t0, t1, t2, t3 = signed[0], signed[1], signed[2], signed[3]
    s0, s1, s2, s3 = signs[0], signs[1], signs[2], signs[3]
    w0, w1, w2, w3 = weights[0], weights[1], weights[2], weights[3]
    for i in range(out.size):
        x0, x1, x2, x3 = d0[i], d1[i], d2[i], d3[i]
        # Each term is rounded before it is added, as mergekit's stack-and-sum does.
        vote = (x0 * v0 + np.sign(x0) * t0) + (x1 * v1 + np.sign(x1) * t1)
        vote = vote + (x2 * v2 + np.sign(x2) * t2) + (x3 * v3 + np.sign(x3) * t3)
        majority = np.float32(np.copysign(one, vote))
        # A vector agrees where sign(weight * delta) is the majority's (zero never agrees).
        a0, a1 = x0 * s0 * majority > zero, x1 * s1 * majority > zero
        a2, a3 = x2 * s2 * majority > zero, x3 * s3 * majority > zero
        mixed = (x0 * c0 if a0 else zero) + (x1 * c1 if a1 else zero)
        mixed = mixed + (x2 * c2 if a2 else zero) + (x3 * c3 if a3 else zero)
        divisor = (w0 if a0 else zero) + (w1 if a1 else zero) + (w2 if a2 else zero) + (w3 if a3 else zero)
        out[i] = base[i] + scale * (mixed / (divisor if divisor != zero else floor))


def elect(
    base: np.ndarray,
    deltas: list[np.ndarray],
    coefficients: list[float],
    weights: list[float],
    scale: float,
    count_votes: bool,
    normalize: bool,
    out: np.ndarray,
) -> np.ndarray:
    """TIES's sign election and disjoint merge in one pass (flat float32 arrays, at most FUSED_VECTORS deltas):
    out = base + scale * sum of coefficient * delta over the deltas whose sign(weight * delta) is the majority's,
    the majority being the sign of the sum of coefficient * delta (or, with count_votes, of sign(weight * delta));
    with normalize the sum is divided by the agreeing weights. The same arithmetic as the torch ops of
    TaskArithmetic, in float32 and in the same order."""
    vectors, _ = _slots(deltas)
    terms, signs, nothing = _per_slot(coefficients), _per_slot(np.sign(weights)), _per_slot([])
    votes, signed = (nothing, signs) if count_votes else (terms, nothing)
    # Where nothing agreed mixed is 0: with positive weights mergekit clamps the divisor, else sets it to 1.
    floor = np.float32(1e-30 if normalize and all(weight > 0 for weight in weights) else 1.0)
    weight_array = _per_slot(weights) if normalize else nothing
    _sliced(_elect, [base, *vectors, out], terms, votes, signed, signs, weight_array, np.float32(scale), floor)
    return out


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _ram(base, d0, d1, d2, d3, out, active, scales, epsilon):  # noqa: ANN001
    zero = np.float32(0.0)
    a0, a1, a2, a3 = active[0], active[1], active[2], active[3]
    s0, s1, s2, s3 = scales[0], scales[1], scales[2], scales[3]
    for i in range(out.size):
        x0, x1, x2, x3 = d0[i], d1[i], d2[i], d3[i]
        n0, n1 = a0 & (abs(x0) > epsilon), a1 & (abs(x1) > epsilon)
        n2, n3 = a2 & (abs(x2) > epsilon), a3 & (abs(x3) > epsilon)
        c0, c1, c2, c3 = x0 if n0 else zero, x1 if n1 else zero, x2 if n2 else zero, x3 if n3 else zero
        count = np.int32(n0) + np.int32(n1) + np.int32(n2) + np.int32(n3)
        shared = np.float32(max(count, 1))
        # A change alone at its element keeps its (scaled) value; changes that share it each add value / count.
        if count == 1:
            merged = c0 * s0 + c1 * s1 + c2 * s2 + c3 * s3
        else:
            merged = c0 / shared + c1 / shared + c2 / shared + c3 / shared
        out[i] = base[i] + merged


def ram(base: np.ndarray, deltas: list[np.ndarray], scales: list[float], epsilon: float, out: np.ndarray) -> np.ndarray:
    """RAM's merge in one pass (flat float32 arrays, at most FUSED_VECTORS task vectors): an element changed
    (|delta| > epsilon) by one model takes that change times the model's scale (1 for RAM, RAM+'s 1 + r * rho),
    one changed by several the mean of their changes; out = base + that. The float32 arithmetic of the torch ops
    in merges/methods/elementwise.py, in their order."""
    vectors, active = _slots(deltas)
    _sliced(_ram, [base, *vectors, out], active, _per_slot(scales, 1.0), np.float32(epsilon))
    return out


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _ram_counts(m0, m1, m2, m3, base, active, epsilon):  # noqa: ANN001
    # Eight scalar sums rather than an indexed table, so the loop vectorizes.
    s0 = s1 = s2 = s3 = u0 = u1 = u2 = u3 = np.int64(0)
    for i in range(base.size):
        d0, d1, d2, d3 = m0[i] - base[i], m1[i] - base[i], m2[i] - base[i], m3[i] - base[i]
        n0, n1 = active[0] & (abs(d0) > epsilon), active[1] & (abs(d1) > epsilon)
        n2, n3 = active[2] & (abs(d2) > epsilon), active[3] & (abs(d3) > epsilon)
        changed = np.int64(n0) + np.int64(n1) + np.int64(n2) + np.int64(n3)
        shared, alone = np.int64(changed > 1), np.int64(changed == 1)  # shared with another model, or its own
        s0, s1, s2, s3 = s0 + (n0 * shared), s1 + (n1 * shared), s2 + (n2 * shared), s3 + (n3 * shared)
        u0, u1, u2, u3 = u0 + (n0 * alone), u1 + (n1 * alone), u2 + (n2 * alone), u3 + (n3 * alone)
    return np.array([[s0, s1, s2, s3], [u0, u1, u2, u3]], dtype=np.int64)


def ram_counts(models: list[np.ndarray], base: np.ndarray, epsilon: float) -> np.ndarray:
    """RAM+'s counts in one pass over the models' own flat float32 arrays and the base's (at most FUSED_VECTORS
    models; each task vector is model - base, the float32 subtraction the engine makes): [2, models] int64, row 0
    each model's changed elements (|task vector| > epsilon) that another model also changes, row 1 those it changes
    alone. It writes nothing, not even the task vectors."""
    own, active = _slots(models)

    def loop(first: int, last: int) -> np.ndarray:
        return _ram_counts(*(array[first:last] for array in own), base[first:last], active, np.float32(epsilon))

    return sum(counts for _, counts in in_parts(base.size, loop))[:, : len(models)]


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _variance(m0, m1, m2, m3, base, out, models):  # noqa: ANN001
    # Welford's update, as torch.var's CPU kernel runs it, written out per model count (a branch the loop does not
    # take per element, so it vectorizes), over the task vectors model - base (float32, as the engine subtracts).
    for i in range(out.size):
        mean, value = np.float64(m0[i] - base[i]), np.float64(m1[i] - base[i])
        delta = value - mean
        mean += delta / 2.0
        squares = delta * (value - mean)
        if models >= 3:
            value = np.float64(m2[i] - base[i])
            delta = value - mean
            mean += delta / 3.0
            squares += delta * (value - mean)
        if models >= 4:
            value = np.float64(m3[i] - base[i])
            delta = value - mean
            mean += delta / 4.0
            squares += delta * (value - mean)
        out[i] = np.float32(squares / models)


def variance(models: list[np.ndarray], base: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out (flat float32) = the population variance across the task vectors model - base of the flat float32
    `models` (at most FUSED_VECTORS), element by element: torch.var(stack, dim=0, unbiased=False) of the task
    vectors bit for bit, Welford's update in float64, in one pass that writes no task vector."""
    _sliced(_variance, [*_slots(models)[0], base, out], len(models))
    return out


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _sce_merge(base, d0, d1, d2, d3, selected, out, active, weights, floor):  # noqa: ANN001
    zero, one = np.float32(0.0), np.float32(1.0)
    a1, a2, a3 = active[1], active[2], active[3]
    w0, w1, w2, w3 = weights[0], weights[1], weights[2], weights[3]
    for i in range(out.size):
        keep = selected[i] != zero  # an unselected element, or a model beyond the count, is a zero change
        x0 = d0[i] if keep else zero
        x1 = d1[i] if keep and a1 else zero
        x2 = d2[i] if keep and a2 else zero
        x3 = d3[i] if keep and a3 else zero
        majority = one if ((x0 + x1) + x2) + x3 >= zero else -one
        # A change agrees where its sign is the majority's (zero never does) and then counts with its weight.
        e0 = w0 if np.sign(x0) == majority else zero
        e1 = w1 if np.sign(x1) == majority else zero
        e2 = w2 if np.sign(x2) == majority else zero
        e3 = w3 if np.sign(x3) == majority else zero
        mixed = ((x0 * e0 + x1 * e1) + x2 * e2) + x3 * e3
        divisor = ((e0 + e1) + e2) + e3
        out[i] = base[i] + mixed / max(divisor, floor)


def sce_merge(
    base: np.ndarray, deltas: list[np.ndarray], selected: np.ndarray, weights: list[float], out: np.ndarray
) -> np.ndarray:
    """SCE's merge in one pass (flat float32 arrays, at most FUSED_VECTORS task vectors): the deltas where
    `selected` is non-zero, their majority sign (of their sum), and out = base + the weighted mean of the deltas
    that agree with it (weights over the agreeing weights, at least 1e-6). The float32 arithmetic of the torch ops
    in merges/methods/elementwise.py, in their order."""
    vectors, active = _slots(deltas)
    _sliced(_sce_merge, [base, *vectors, selected, out], active, _per_slot(weights), np.float32(1e-6))
    return out


@numba.njit(nogil=True, cache=True, error_model="numpy", fastmath={"reassoc", "nsz"})
def _masked_squares(values: np.ndarray, mask: np.ndarray) -> float:
    # reassoc lets the float64 sum vectorize: a sum of squares is accurate to ~1e-15 relative in any order.
    total, zero = 0.0, np.float32(0.0)
    for i in range(values.size):
        value = np.float64(values[i])
        total += value * value if mask[i] != zero else 0.0
    return total


def masked_squares(deltas: list[np.ndarray], mask: np.ndarray) -> list[float]:
    """For each flat float32 delta, the sum in float64 of its squares where `mask` is non-zero: SCE's weights
    of a tensor in chunks, one pass per delta that writes nothing."""
    sums = []
    for delta in deltas:
        parts = in_parts(
            delta.size, lambda first, last, delta=delta: _masked_squares(delta[first:last], mask[first:last])
        )
        sums.append(sum(total for _, total in parts))
    return sums


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _bracket(magnitudes, low, high, out):  # noqa: ANN001
    # Branch-free compaction: every value is written at the next free slot, which advances only when it is kept.
    at_least_low, kept = 0, 0
    for i in range(magnitudes.size):
        value = magnitudes[i]
        out[kept] = value
        at_least_low += value >= low
        kept += (value >= low) & (value <= high)
    return at_least_low, kept


def scan_bracket(magnitudes: np.ndarray, low: float, high: float) -> tuple[int, np.ndarray]:
    """How many of the flat float32 `magnitudes` are >= low, and those in [low, high] in flat order: one pass, on
    the pool's threads."""
    bounds = np.float32(low), np.float32(min(high, np.finfo(np.float32).max))

    def scan(first: int, last: int) -> tuple[int, np.ndarray]:
        out = np.empty(last - first + 1, dtype=np.float32)  # pages are touched only as far as values are kept
        at_least_low, kept = _bracket(magnitudes[first:last], *bounds, out)
        return at_least_low, out[:kept]

    parts = [scanned for _, scanned in in_parts(magnitudes.size, scan)]
    return sum(count for count, _ in parts), np.concatenate([values for _, values in parts])


_HIGH_BITS, _LOW_BITS = 1 << 15, 1 << 16  # a non-negative float32's bits: its top 16 (below 2^15), its low 16


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _high_histogram(bits, out):  # noqa: ANN001
    for i in range(bits.size):
        out[bits[i] >> 16] += 1


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _low_histogram(bits, high, out):  # noqa: ANN001
    for i in range(bits.size):
        value = bits[i]
        if (value >> 16) == high:
            out[value & 0xFFFF] += 1


def _histogram(kernel: Callable[..., None], bits: np.ndarray, bins: int, *fixed: object) -> np.ndarray:
    parts = in_parts(bits.size, lambda first, last: _filled(kernel, bits[first:last], bins, *fixed))
    return sum(histogram for _, histogram in parts)


def _filled(kernel: Callable[..., None], bits: np.ndarray, bins: int, *fixed: object) -> np.ndarray:
    histogram = np.zeros(bins, dtype=np.int64)
    kernel(bits, *fixed, histogram)
    return histogram


def order_statistics(values: np.ndarray, positions: list[int]) -> dict[int, tuple[float, int, int]]:
    """For each ascending position p of the flat float32 non-negative `values` (0 <= p < size): (the value at p,
    how many values are above it, how many equal it), by two histogram passes over the bits (the top 16, then the
    low 16 of each position's top bin), ties and all, without copying or reordering the values. Non-negative floats
    order as their bits. numpy's partition, which this replaces for whole tensors, takes 6 ns per element on this
    machine's CPU (one core); this about 2."""
    bits = values.view(np.int32)
    high_through = np.cumsum(_histogram(_high_histogram, bits, _HIGH_BITS))  # values in this top bin or lower ones
    tops = {position: int(np.searchsorted(high_through, position, side="right")) for position in positions}
    low_through = {
        top: np.cumsum(_histogram(_low_histogram, bits, _LOW_BITS, np.int32(top))) for top in set(tops.values())
    }
    found = {}
    for position, top in tops.items():
        below_top = int(high_through[top - 1]) if top else 0
        through = low_through[top]
        bottom = int(np.searchsorted(through, position - below_top, side="right"))
        below = below_top + (int(through[bottom - 1]) if bottom else 0)
        tied = below_top + int(through[bottom]) - below
        value = float(np.array([(top << 16) | bottom], dtype=np.int32).view(np.float32)[0])
        found[position] = (value, values.size - below - tied, tied)
    return found


_FEW_PENDING = 16  # della's rows with at most this many undecided draws rank them by scans of the row
_LANES = 4  # histograms a row's bucket counts are spread over (a power of 2)


@numba.njit(nogil=True, cache=True, error_model="numpy", fastmath={"reassoc"})
def _kept_row(values: np.ndarray, out: np.ndarray) -> float:
    """out = values * out (a row's mask, 0.0 or 1.0, becomes its kept values, as torch's mask.mul_ makes them);
    returns their L1 norm, in float32 blocks as _kept_l1 sums."""
    total = 0.0
    for first in range(0, out.size, _L1_BLOCK):
        block, own, kept = np.float32(0.0), values[first : first + _L1_BLOCK], out[first : first + _L1_BLOCK]
        for i in range(own.size):
            value = own[i] * kept[i]
            kept[i] = value
            block += abs(value)
        total += np.float64(block)
    return total


_VALUES, _BITS = 0, 1  # what della's loop writes: the kept values, or the mask as bits (and the kept values' norm)


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _pack_row(mask: np.ndarray, packed: np.ndarray, at: int) -> None:
    """Set bit `at` + k of `packed` (np.packbits' little bit order) where mask[k] is non-zero: whole bytes eight
    elements at a time (a loop that vectorizes), bits one by one only at the row's unaligned ends."""
    size = mask.size
    head = min(size, -at & 7)  # bits before the row's first whole byte
    whole, first_byte = (size - head) >> 3, (at + head) >> 3
    for k in range(whole):
        j, byte = head + 8 * k, np.uint8(0)
        for bit in range(8):  # unrolled by the compiler
            byte |= np.uint8(mask[j + bit] != 0) << bit
        packed[first_byte + k] = byte
    for column in range(head):
        packed[(at + column) >> 3] |= np.uint8((mask[column] != 0) << ((at + column) & 7))
    for column in range(head + 8 * whole, size):
        packed[(at + column) >> 3] |= np.uint8((mask[column] != 0) << ((at + column) & 7))


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _della_rows(vectors, base, probability, seed, start, buckets, output, out, packed, first_bit):  # noqa: ANN001
    # vectors: rows of task vectors, or of a model's own values where `base` has rows (each row's task vector is
    # then model - base, subtracted into a row buffer); output _VALUES into `out`, _BITS into `packed`.
    rows, columns = vectors.shape
    kept_l1 = 0.0
    subtract = base.shape[0] > 0
    task, row_keep = np.empty(columns, dtype=np.float32), np.empty(columns, dtype=np.float32)
    bits, bucket_of = np.empty(columns, dtype=np.int32), np.empty(columns, dtype=np.int32)
    position, members = np.empty(columns, dtype=np.int32), np.empty(columns, dtype=np.int32)
    pending, draws = np.empty(columns, dtype=np.int32), np.empty(columns, dtype=np.float32)
    first_of, cursor = np.empty(buckets + 2, dtype=np.int32), np.empty(buckets + 1, dtype=np.int32)
    surely, maybe = np.empty(buckets + 1, dtype=np.float32), np.empty(buckets + 1, dtype=np.float32)
    pure = np.empty(buckets + 1, dtype=np.int8)
    counts = np.empty((_LANES, buckets + 1), dtype=np.int32)
    for row in range(rows):
        if subtract:
            for column in range(columns):
                task[column] = vectors[row, column] - base[row, column]
        values = task if subtract else vectors[row]
        row_bits = values.view(np.int32)
        mask = row_keep if output == _BITS else out[row]
        first = start + row * columns
        for column in range(columns):
            draws[column] = np.float32(_draw(seed, first + column)) * _UNIT
        # Buckets of |x|'s float32 bits (ordered as the magnitudes are): bucket 0 holds the zeros, buckets 1.. split
        # the others' range evenly, so bucket b's members hold the ranks [first_of[b], first_of[b + 1]).
        low, high = np.int32(0x7FFFFFFF), np.int32(0)
        for column in range(columns):
            value = row_bits[column] & 0x7FFFFFFF
            bits[column] = value
            low = min(low, value if value != 0 else np.int32(0x7FFFFFFF))
            high = max(high, value)
        low = min(low, high)
        shift = 0
        while ((high - low) >> shift) >= buckets:
            shift += 1
        used = ((high - low) >> shift) + 2
        for b in range(used):
            pure[b] = -1
            for lane in range(_LANES):
                counts[lane, b] = 0
        for column in range(columns):
            value = bits[column]
            bucket_of[column] = ((value - low) >> shift) + 1 if value != 0 else 0
        # Counted in _LANES histograms by column: consecutive elements in one bucket (most of a row falls into a
        # few) would otherwise wait on each other's increment.
        for column in range(columns):
            counts[column & (_LANES - 1), bucket_of[column]] += 1
        for b in range(used):
            cursor[b] = 0
            for lane in range(_LANES):
                cursor[b] += counts[lane, b]
        total = 0
        for b in range(used):
            first_of[b] = total
            if cursor[b] > 0:  # the keep probabilities of the bucket's ranks lie within [surely, maybe]
                at_first, at_last = probability[total], probability[total + cursor[b] - 1]
                surely[b], maybe[b] = min(at_first, at_last), max(at_first, at_last)
            total += cursor[b]
            cursor[b] = first_of[b]
        first_of[used] = total
        # Most draws are decided by the bucket alone (below every probability of its ranks: kept; at or above
        # every one: dropped); the rest, pending, take their exact rank.
        count = 0
        for column in range(columns):
            b, draw = bucket_of[column], draws[column]
            keep = draw < surely[b]
            mask[column] = np.float32(keep)
            pending[count] = column
            count += (draw < maybe[b]) & (not keep)
        if count <= _FEW_PENDING:  # a scan of the row for each costs less than placing every element by bucket
            for k in range(count):
                column = pending[k]
                b, mine = bucket_of[column], bits[column]
                rank = first_of[b]  # and the bucket's smaller magnitudes, and its equal ones in earlier columns
                for j in range(columns):
                    rank += (bucket_of[j] == b) & ((bits[j] < mine) | ((bits[j] == mine) & (j < column)))
                mask[column] = np.float32(draws[column] < probability[rank])
        else:
            for column in range(columns):  # each bucket's members in column order, and each one's place among them
                b = bucket_of[column]
                position[column] = cursor[b]
                members[cursor[b]] = column
                cursor[b] += 1
            for k in range(count):
                column = pending[k]
                b = bucket_of[column]
                begin, end = first_of[b], first_of[b + 1]
                if pure[b] < 0:  # one magnitude throughout (ties): the counting sort's place is the rank
                    value, same = bits[members[begin]], True
                    for j in range(begin + 1, end):
                        same &= bits[members[j]] == value
                    pure[b] = same
                if pure[b] == 1:
                    rank = position[column]
                else:  # smaller magnitudes in the bucket, and equal ones in earlier columns
                    mine, rank = bits[column], begin
                    for j in range(begin, end):
                        other = members[j]
                        rank += (bits[other] < mine) | ((bits[other] == mine) & (other < column))
                mask[column] = np.float32(draws[column] < probability[rank])
        if output == _BITS:  # the mask as bits, then (in the row buffer) the kept values for their L1 norm
            _pack_row(mask, packed, first_bit + row * columns)
        kept_l1 += _kept_row(values, mask)  # while the row is in cache: its kept values and their L1 norm
    return kept_l1


def della_keep(vectors: np.ndarray, density: float, epsilon: float, seed: int, start: int, out: np.ndarray) -> float:
    """DELLA's drop of a block of rows of task vectors (float32 [rows, columns], flat offset `start` in the tensor's
    stream `seed`): out = the task vectors times the mask, 1.0 where an element's draw (as `uniform` draws it) is
    below its keep probability, density - epsilon + 2 epsilon * rank / (columns - 1) computed in float32 as the
    torch ops do, rank being its magnitude's ascending place in its row with ties by column, else 0.0 (torch's
    mask.mul_, signed zeros too); returns out's L1 norm (a rescale's), each row summed while it is in cache.

    Without a sort: each row's magnitudes are counted into buckets (about columns / 4), which bound every
    element's rank; a draw outside its bucket's probabilities is decided by that, and the few others (about
    2 * epsilon * the bucket's share of the row) get their exact rank from their bucket's members. numpy's row sort,
    which this replaces, ran 3 ns per element on one CPU and 17 on another (AMD Zen 4, whose AVX-512 compress
    stores numpy's sort uses are slow); this runs 2.4-2.7 on the latter (one core, a 134M family's task vectors),
    3.7-6.3 on the test's random rows."""
    base, packed = np.empty((0, vectors.shape[1]), dtype=np.float32), np.empty(0, dtype=np.uint8)
    return _della(vectors, base, density, epsilon, seed, start, _VALUES, out, packed)


def della_kept_bits(
    model: np.ndarray, base: np.ndarray, density: float, epsilon: float, seed: int, start: int
) -> tuple[np.ndarray, float]:
    """della_keep's mask of the task vectors model - base (float32 [rows, columns] each, subtracted row by row as
    the engine subtracts them, so none is written) as bits (np.packbits of the flat mask, little bit order: what
    `unpack_product` takes), and the L1 norm of the kept task vector: a rescale's whole-tensor pass over a tensor
    merged in chunks, which records the bits for its merge pass."""
    packed = np.zeros(-(-model.size // 8), dtype=np.uint8)
    out = np.empty((0, model.shape[1]), dtype=np.float32)
    return packed, _della(model, base, density, epsilon, seed, start, _BITS, out, packed)


def _della(
    vectors: np.ndarray,
    base: np.ndarray,
    density: float,
    epsilon: float,
    seed: int,
    start: int,
    output: int,
    out: np.ndarray,
    packed: np.ndarray,
) -> float:
    rows, columns = vectors.shape
    ranks = np.arange(columns, dtype=np.float32) / np.float32(max(columns - 1, 1))
    probability = ranks * np.float32(2 * epsilon) + np.float32(density - epsilon)
    key, buckets = np.uint64(seed), max(16, columns // 4)
    # Parts of whole bytes where bits are written (8 rows hold a whole number of bytes): no byte has two writers.
    group = 8 if output == _BITS else 1

    def part(first: int, last: int) -> float:
        first, last = first * group, min(last * group, rows)
        block = (vectors[first:last], base[first:last], probability, key, start + first * columns, buckets)
        return _della_rows(*block, output, out[first:last], packed, first * columns)

    return sum(total for _, total in in_parts(-(-rows // group), part, unit=columns * group))


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _unpack_product(values, packed, first, out):  # noqa: ANN001
    for i in range(values.size):
        bit = first + i
        out[i] = values[i] * np.float32((packed[bit >> 3] >> (bit & 7)) & 1)


def unpack_product(values: np.ndarray, packed: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out (flat float32) = values times the 0/1 mask that `packed` holds as bits (np.packbits, little bit order):
    torch's unpacked mask.mul_(values), bit for bit, in one pass that writes no mask."""
    in_parts(out.size, lambda first, last: _unpack_product(values[first:last], packed, first, out[first:last]))
    return out
