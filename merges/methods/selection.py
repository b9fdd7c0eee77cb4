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
        tied = (magnitudes.reshape(-1) == self.value).nonzero().squeeze(1)  # before `out` may overwrite it
        torch.gt(magnitudes, self.value, out=out)
        room = self.tied_kept - self.tied_before.get(start, 0)
        if room > 0:
            out.view(-1)[tied[:room]] = 1.0
        return out


def top_cut(
    count: int,
    total: int,
    chunks: MagnitudeChunks,
    single: torch.Tensor | None = None,
    sample: np.ndarray | None = None,
) -> TopCut:
    """The cut of the `count` largest of `total` non-negative finite magnitudes. `single` is the whole tensor's
    magnitudes when it is held in one chunk; otherwise `chunks()` streams them (called once per pass), and
    `sample`, an ascending sample of them, brackets the cut so that one pass finds it."""
    if count >= total or count <= 0:
        return TopCut(count, total)
    if single is not None:
        return _cut_in_memory(count, total, single)
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
        above += int(torch.count_nonzero(flat > high))
        values = flat[(flat >= low) & (flat <= high)]
        if values.numel() > _MOST_IN_BRACKET * flat.numel():
            return None
        inside.append((start, values.cpu().numpy()))
    collected = np.concatenate([values for _, values in inside])
    within = count - above  # the cut is the within-th largest collected value
    if not 0 < within <= collected.size:
        return None
    value = np.partition(collected, collected.size - within)[collected.size - within]
    greater = above + int(np.count_nonzero(collected > value))
    tied = int(np.count_nonzero(collected == value))
    if value == 0 or greater + tied <= count:
        return TopCut(count, total, float(value))
    tied_before, seen = {}, 0
    for start, values in inside:
        tied_before[start] = seen
        seen += int(np.count_nonzero(values == value))
    return TopCut(count, total, float(value), tied_kept=count - greater, tied_before=tied_before)


def _cut_in_memory(count: int, total: int, magnitudes: torch.Tensor) -> TopCut:
    split = total - count
    if magnitudes.device.type != "cpu":  # on an accelerator: its own selection, no copy to the host
        value = float(torch.kthvalue(magnitudes.reshape(-1), split + 1).values)
        if value == 0 or int((magnitudes >= value).sum()) == count:
            return TopCut(count, total, value)
        above = int((magnitudes > value).sum())
        return TopCut(count, total, value, tied_kept=count - above, tied_before={0: 0})
    values = magnitudes.reshape(-1).numpy()
    partitioned = np.partition(values, split)  # [split] is the count-th largest; left <= it <= right
    value = partitioned[split]
    if value == 0 or partitioned[:split].max() != value:  # zeros add nothing, whichever of them is kept
        return TopCut(count, total, float(value))
    above = int(np.count_nonzero(partitioned[split:] > value))
    return TopCut(count, total, float(value), tied_kept=count - above, tied_before={0: 0})


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
    tied_before, seen = {}, 0
    for start, magnitudes in chunks():  # a tie straddles the cut: where the tied elements lie decides which stay
        tied_before[start] = seen
        seen += int((magnitudes == value).sum())
    return TopCut(count, total, value, tied_kept=count - above, tied_before=tied_before)
