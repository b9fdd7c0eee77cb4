"""Exact top-k selection by magnitude over a tensor that is only ever seen in chunks: the cut (the k-th largest
magnitude) and which tied elements at the cut are kept, so TIES, magnitude and breadcrumbs need no sorted table.

A tensor held in one chunk is cut with numpy's introselect on a copy of its magnitudes (O(n)); a tensor seen in
several chunks with a two-level radix select on the float bits (non-negative floats order as their int32 bits),
one histogram pass per 16 bits, so no pass holds more than one chunk. Ties at the cut go to the earliest elements
in flat order, the rule the engine has always used.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from safemerge.merges.methods.cpu_kernels import in_parts, scan_bracket

MagnitudeChunks = Callable[[], Iterable[tuple[int, torch.Tensor]]]  # fresh (start, |tensor| chunk) pairs per call


@dataclass(frozen=True)
class TopCut:
    """The `count` largest magnitudes of a tensor of `total` elements: those above `value`, and of those equal to
    it, when a tie straddles the cut, the first `tied_kept` in flat order (`tied_before[start]` of them lie in the
    chunks before the one at `start`)."""

    count: int
    total: int
    value: float = 0.0
    tied_kept: int | None = None  # None: every element equal to `value` is kept
    tied_before: dict[int, int] = field(default_factory=dict)
    tied_within: dict[int, int] = field(default_factory=dict)  # elements equal to `value` in the chunk at start

    @property
    def straddles(self) -> bool:
        return self.tied_kept is not None

    def mask(self, magnitudes: torch.Tensor, start: int, out: torch.Tensor) -> torch.Tensor:
        """out = 1.0 where the chunk's element (at flat offset `start` in the tensor) is kept, else 0.0; `out`
        may be `magnitudes` itself."""
        if self.count >= self.total:
            return out.fill_(1.0)
        if self.count <= 0:
            return out.zero_()
        if self.tied_kept is None:
            return torch.ge(magnitudes, self.value, out=out)
        room = self.tied_kept - self.tied_before.get(start, 0)
        if room <= 0:  # the kept tied elements all lie in earlier chunks
            return torch.gt(magnitudes, self.value, out=out)
        if room >= self.tied_within.get(start, self.total):  # every tied element of this chunk is kept
            return torch.ge(magnitudes, self.value, out=out)
        tied = _positions_equal(magnitudes, self.value, room)  # before `out` may overwrite it
        torch.gt(magnitudes, self.value, out=out)
        out.view(-1)[tied] = 1.0
        return out

    def sparsify(self, vector: torch.Tensor, start: int, out: torch.Tensor) -> torch.Tensor:
        """out = vector where |vector| is kept (the chunk at flat offset `start`), else 0: mask(|vector|) *
        vector, in one pass (hardshrink keeps x where |x| > lambd) unless a tie straddles the cut in this chunk."""
        if self.count >= self.total:
            return out.copy_(vector)
        if self.count <= 0:
            return out.zero_()
        room = self.total if self.tied_kept is None else self.tied_kept - self.tied_before.get(start, 0)
        if room <= 0:  # |x| > value
            return torch.hardshrink(vector, self.value, out=out)
        if room >= self.tied_within.get(start, self.total):  # |x| >= value: above the largest float below it
            if self.value == 0:
                return out.copy_(vector)
            return torch.hardshrink(vector, float(np.nextafter(np.float32(self.value), np.float32(0))), out=out)
        torch.abs(vector, out=out)
        return self.mask(out, start, out=out).mul_(vector)


def _positions_equal(magnitudes: torch.Tensor, value: float, room: int) -> torch.Tensor:
    """Flat positions of the first `room` elements equal to `value`."""
    flat = magnitudes.reshape(-1)
    if flat.device.type == "cpu":
        array = flat.numpy()
        parts = in_parts(array.size, lambda first, last: np.flatnonzero(array[first:last] == np.float32(value)))
        return torch.from_numpy(np.concatenate([positions + offset for offset, positions in parts])[:room])
    return (flat == value).nonzero().squeeze(1)[:room]


def top_cut(
    count: int,
    total: int,
    chunks: MagnitudeChunks,
    single: torch.Tensor | None = None,
    sample: np.ndarray | None = None,
    workspace: torch.Tensor | None = None,
) -> TopCut:
    """The cut of the `count` largest of `total` non-negative finite magnitudes. `single` is the whole tensor's
    magnitudes when it is held in one chunk (`workspace`, a buffer of its size, spares the selection a fresh
    copy); otherwise `chunks()` streams them (called once per pass), and `sample`, an ascending sample of them,
    brackets the cut so that one pass finds it."""
    if count >= total or count <= 0:
        return TopCut(count, total)
    if single is not None:
        return _cut_in_memory(count, total, single, workspace)
    if sample is not None and sample.size:
        cut = _cut_in_bracket(count, total, chunks, sample)
        if cut is not None:
            return cut
    return _cut_by_radix(count, total, chunks)


def sample_positions(start: int, size: int, total: int, samples: int = 4096) -> slice:
    """Which elements of a chunk [start, start + size) belong to a tensor's strided sample of about `samples`."""
    stride = max(1, total // samples)
    return slice((-start) % stride, size, stride)


_BRACKET_SIGMAS = 5.0  # a sample quantile's error is binomial: the cut falls outside 5 sigmas about once in 10^6
_MOST_IN_BRACKET = 0.25  # a bracket holding more than this share of a chunk (many equal values) is not worth it


def _cut_in_bracket(count: int, total: int, chunks: MagnitudeChunks, sample: np.ndarray) -> TopCut | None:
    """One pass: count what lies above a bracket [low, high] around the sample's estimate of the cut and collect
    what lies in it, then select in the collected values. None when the cut is outside the bracket after all."""
    size = sample.size
    rank = size * (1 - count / total)  # the cut's ascending position in the sample
    margin = _BRACKET_SIGMAS * math.sqrt(size * (count / total) * (1 - count / total)) + 2
    low = float(sample[int(rank - margin)]) if rank - margin >= 0 else 0.0
    high = float(sample[int(rank + margin) + 1]) if int(rank + margin) + 1 < size else math.inf
    if low == high:
        return None  # many equal values at the cut (a frozen tensor): the radix handles them without collecting
    above, inside = 0, []
    for start, magnitudes in chunks():
        flat = magnitudes.reshape(-1)
        if flat.device.type == "cpu":  # one compiled pass, a part of the chunk per thread
            at_least_low, values = scan_bracket(flat.numpy(), low, high)
        else:
            at_least_low = int(torch.count_nonzero(flat >= low))
            values = flat[(flat >= low) & (flat <= high)].cpu().numpy()
        above += at_least_low - values.size
        if values.size > _MOST_IN_BRACKET * flat.numel():
            return None
        inside.append((start, values))
    collected = np.concatenate([values for _, values in inside])
    within = count - above  # the cut is the within-th largest collected value
    if not 0 < within <= collected.size:
        return None
    value = np.partition(collected, collected.size - within)[collected.size - within]
    greater = above + int(np.count_nonzero(collected > value))
    tied = int(np.count_nonzero(collected == value))
    if value == 0 or greater + tied <= count:
        return TopCut(count, total, float(value))
    tied_before, tied_within, seen = {}, {}, 0
    for start, values in inside:
        tied_before[start], tied_within[start] = seen, int(np.count_nonzero(values == value))
        seen += tied_within[start]
    return TopCut(count, total, float(value), count - greater, tied_before, tied_within)


def _cut_in_memory(count: int, total: int, magnitudes: torch.Tensor, workspace: torch.Tensor | None) -> TopCut:
    split = total - count
    if magnitudes.device.type != "cpu":  # on an accelerator: its own selection, no copy to the host
        value = float(torch.kthvalue(magnitudes.reshape(-1), split + 1).values)
        tied = int((magnitudes == value).sum())
        above = int((magnitudes > value).sum())
        if value == 0 or above + tied == count:
            return TopCut(count, total, value)
        return TopCut(count, total, value, count - above, {0: 0}, {0: tied})
    values = magnitudes.reshape(-1).numpy()
    if workspace is not None:  # partitioned in place in a buffer already resident: no fresh pages to fault in
        partitioned = workspace.reshape(-1)[:total].numpy()
        np.copyto(partitioned, values)
        partitioned.partition(split)  # [split] is the count-th largest; left <= it <= right
    else:
        partitioned = np.partition(values, split)
    value = partitioned[split]
    if value == 0 or partitioned[:split].max() != value:  # zeros add nothing, whichever of them is kept
        return TopCut(count, total, float(value))
    above = int(np.count_nonzero(partitioned[split:] > value))
    tied = int(np.count_nonzero(partitioned == value))
    return TopCut(count, total, float(value), count - above, {0: 0}, {0: tied})


_HIGH_BINS = 1 << 15  # the sign bit of a magnitude is 0: its top 16 bits are below 2^15
_LOW_BINS = 1 << 16


def _bin_of_rank(histogram: torch.Tensor, rank: int) -> tuple[int, int]:
    """The bin holding the `rank`-th largest element (1-based) and how many elements lie in higher bins."""
    from_top = histogram.flip(0).cumsum(0)
    index = int(torch.searchsorted(from_top, torch.tensor(rank, dtype=from_top.dtype)))
    found = histogram.numel() - 1 - index
    return found, int(from_top[index]) - int(histogram[found])


def _cut_by_radix(count: int, total: int, chunks: MagnitudeChunks) -> TopCut:
    high = torch.zeros(_HIGH_BINS, dtype=torch.int64)
    for _, magnitudes in chunks():
        bits = magnitudes.reshape(-1).view(torch.int32)
        high += torch.bincount((bits >> 16).cpu(), minlength=_HIGH_BINS)
    high_bin, above_high = _bin_of_rank(high, count)
    low = torch.zeros(_LOW_BINS, dtype=torch.int64)
    for _, magnitudes in chunks():
        bits = magnitudes.reshape(-1).view(torch.int32)
        in_bin = bits[(bits >> 16) == high_bin]
        low += torch.bincount((in_bin & 0xFFFF).cpu(), minlength=_LOW_BINS)
    low_bin, above_low = _bin_of_rank(low, count - above_high)
    value = float(torch.tensor([(high_bin << 16) | low_bin], dtype=torch.int32).view(torch.float32))
    above, tied = above_high + above_low, int(low[low_bin])
    if value == 0 or above + tied <= count:
        return TopCut(count, total, value)
    tied_before, tied_within, seen = {}, {}, 0
    for start, magnitudes in chunks():  # a tie straddles the cut: where the tied elements lie decides which stay
        tied_before[start], tied_within[start] = seen, int((magnitudes == value).sum())
        seen += tied_within[start]
    return TopCut(count, total, value, count - above, tied_before, tied_within)
