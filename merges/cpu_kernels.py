"""The merge's hot loops on the CPU, compiled with numba: a counter-based random draw, and TIES's sign election
with its disjoint merge in one pass over the elements.

Why numba: the same steps as torch ops take one pass over memory per op (a DARE-TIES merge of two task vectors is
about 20 of them per element) and torch's CPU generator is serial; compiled loops take one pass and vectorize.
Each loop is serial and releases the GIL, and `in_parts` runs it on the merge's thread pool over consecutive parts
of the elements, so numba's own threading layer (which must not be entered from two threads at once) is not used.
Compiled code is cached on disk (numba's `cache=True`), so a process pays the compile once per machine.

The torch ops in merges/methods stay the reference (and the GPU path); tests compare the two on the CPU."""

from __future__ import annotations

from collections.abc import Callable

import numba
import numpy as np

from safemerge.merges.methods.selection import CPU_THREADS, cpu_pool

_PARALLEL_ELEMENTS = 1 << 16  # below this a loop is not worth splitting across the pool

# splitmix64 (Steele, Lea and Flood 2014): element k of a stream is mix(seed + (k + 1) * golden), so any element is
# drawn without the ones before it, and a tensor's stream does not depend on how its chunks are cut.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S27, _S30, _S31, _S40 = np.uint64(27), np.uint64(30), np.uint64(31), np.uint64(40)
UNIFORM_BITS = 24  # a float32 in [0, 1) holds 24 random bits exactly


@numba.njit(nogil=True, cache=True, inline="always")
def _draw(seed: np.uint64, index: int) -> np.uint64:
    """The top 24 bits of element `index`'s 64-bit hash."""
    z = seed + (np.uint64(index) + np.uint64(1)) * _GOLDEN
    z = (z ^ (z >> _S30)) * _MIX1
    z = (z ^ (z >> _S27)) * _MIX2
    return (z ^ (z >> _S31)) >> _S40


@numba.njit(nogil=True, cache=True)
def _uniform(out: np.ndarray, seed: np.uint64, start: int) -> None:
    scale = np.float32(1.0 / (1 << 24))
    for i in range(out.size):
        out[i] = np.float32(_draw(seed, start + i)) * scale


@numba.njit(nogil=True, cache=True)
def _keep(out: np.ndarray, seed: np.uint64, start: int, threshold: np.uint64) -> None:
    one, zero = np.float32(1.0), np.float32(0.0)
    for i in range(out.size):
        out[i] = one if _draw(seed, start + i) < threshold else zero


def in_parts(size: int, loop: Callable[[int, int], None]) -> None:
    """loop(first, last) over consecutive parts of range(size), one part per pool thread."""
    if CPU_THREADS == 1 or size < _PARALLEL_ELEMENTS:
        loop(0, size)
        return
    step = -(-size // CPU_THREADS)
    list(cpu_pool.map(lambda first: loop(first, min(first + step, size)), range(0, size, step)))


def uniform(out: np.ndarray, seed: int, start: int) -> None:
    """out (flat float32) = elements [start, start + size) of the stream `seed`, each k * 2**-24 for a uniform
    24-bit k: U[0, 1) exactly as fine as float32 holds it."""
    key = np.uint64(seed)
    in_parts(out.size, lambda first, last: _uniform(out[first:last], key, start + first))


def keep(out: np.ndarray, probability: float, seed: int, start: int) -> None:
    """out (flat float32) = 1.0 where the element of stream `seed` is kept, else 0.0: kept when its uniform draw
    is below `probability` (to 2**-24), the same draws `uniform` gives."""
    key, threshold = np.uint64(seed), np.uint64(round(probability * (1 << UNIFORM_BITS)))
    in_parts(out.size, lambda first, last: _keep(out[first:last], key, start + first, threshold))
