"""Exact top-k selection by magnitude over a tensor that is only ever seen in chunks: the cut (the k-th largest
magnitude) and which tied elements at the cut are kept, so TIES, magnitude and breadcrumbs need no sorted table.

A tensor held in one chunk is cut with numpy's introselect on a copy of its magnitudes (O(n)); a tensor seen in
several chunks with a two-level radix select on the float bits (non-negative floats order as their int32 bits),
one histogram pass per 16 bits, so no pass holds more than one chunk. Ties at the cut go to the earliest elements
in flat order, the rule the engine has always used.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from safemerge.merges.methods.cpu_kernels import in_parts, order_statistics, scan_bracket

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


def top_cuts(
    counts: Sequence[int],
    total: int,
    chunks: MagnitudeChunks,
    single: torch.Tensor | None = None,
    sample: np.ndarray | None = None,
) -> list[TopCut]:
    """The cuts of the `counts` largest (each) of `total` non-negative finite magnitudes, from one selection:
    `single` is the whole tensor's magnitudes when it is held in one chunk (one selection places every cut);
    otherwise `chunks()` streams them (called once
    per pass, every count served by the same passes), and `sample`, an ascending sample of them, brackets the
    cuts so that one pass finds them."""
    wanted = sorted({count for count in counts if 0 < count < total})
    found: dict[int, TopCut] = {}
    if wanted and single is not None:
        flat = single.reshape(-1)
        if flat.device.type == "cpu" and total >= _SAMPLED_FROM:  # a compiled scan beats partitioning everything
            sample = np.sort(flat[sample_positions(0, total, total)].numpy())
            found = _cuts_in_bracket(wanted, total, lambda: iter([(0, flat)]), sample)
        missed = [count for count in wanted if count not in found]
        if missed:
            found.update(zip(missed, _cuts_in_memory(missed, total, single), strict=True))
    elif wanted:
        if sample is not None and sample.size:
            found = _cuts_in_bracket(wanted, total, chunks, sample)
        missed = [count for count in wanted if count not in found]
        if missed:
            found.update(zip(missed, _cuts_by_radix(missed, total, chunks), strict=True))
    return [found.get(count) or TopCut(count, total) for count in counts]


def ascending_values(values: torch.Tensor, positions: Sequence[int]) -> list[float]:
    """The values at ascending 0-based `positions` of a tensor (any sign), as a full sort would place them, by one
    selection: numpy's partition at every position at once on the CPU, kthvalue elsewhere."""
    flat = values.reshape(-1)
    if flat.device.type != "cpu":
        return [float(torch.kthvalue(flat, position + 1).values) for position in positions]
    partitioned = np.partition(flat.numpy(), sorted(set(positions)))
    return [float(partitioned[position]) for position in positions]


def sample_positions(start: int, size: int, total: int, samples: int = 4096) -> slice:
    """Which elements of a chunk [start, start + size) belong to a tensor's strided sample of about `samples`."""
    stride = max(1, total // samples)
    return slice((-start) % stride, size, stride)


_SAMPLED_FROM = 1 << 16  # a tensor in one chunk of at least this many elements is cut through a sampled bracket
_BRACKET_SIGMAS = 5.0  # a sample quantile's error is binomial: the cut falls outside 5 sigmas about once in 10^6
_MOST_IN_BRACKET = 0.25  # a bracket holding more than this share of a chunk (many equal values) is not worth it


def _cuts_in_bracket(counts: list[int], total: int, chunks: MagnitudeChunks, sample: np.ndarray) -> dict[int, TopCut]:
    """One pass: for each count, count what lies above a bracket [low, high] around the sample's estimate of its
    cut and collect what lies in it, then select in the collected values. The counts whose cut falls outside its
    bracket after all (or whose bracket is a single value) are left out."""
    size = sample.size
    brackets = {}
    for count in counts:
        rank = size * (1 - count / total)  # the cut's ascending position in the sample
        margin = _BRACKET_SIGMAS * math.sqrt(size * (count / total) * (1 - count / total)) + 2
        low = float(sample[int(rank - margin)]) if rank - margin >= 0 else 0.0
        high = float(sample[int(rank + margin) + 1]) if int(rank + margin) + 1 < size else math.inf
        if low != high:  # else many equal values at the cut (a frozen tensor): the radix handles them
            brackets[count] = (low, high)
    above = dict.fromkeys(brackets, 0)
    inside: dict[int, list[tuple[int, np.ndarray]]] = {count: [] for count in brackets}
    for start, magnitudes in chunks():
        flat = magnitudes.reshape(-1)
        for count, (low, high) in list(brackets.items()):
            if flat.device.type == "cpu":  # one compiled pass, a part of the chunk per thread
                at_least_low, values = scan_bracket(flat.numpy(), low, high)
            else:
                at_least_low = int(torch.count_nonzero(flat >= low))
                values = flat[(flat >= low) & (flat <= high)].cpu().numpy()
            if values.size > _MOST_IN_BRACKET * flat.numel():
                del brackets[count]  # not worth collecting: the radix takes this count
                continue
            above[count] += at_least_low - values.size
            inside[count].append((start, values))
    found = {}
    for count in brackets:
        cut = _cut_in_collected(count, total, above[count], inside[count])
        if cut is not None:
            found[count] = cut
    return found


def _cut_in_collected(count: int, total: int, above: int, inside: list[tuple[int, np.ndarray]]) -> TopCut | None:
    """The cut from the values collected in its bracket (per chunk start) and the count above the bracket; None
    when the cut is not among them."""
    collected = np.concatenate([values for _, values in inside])
    within = count - above  # the cut is the within-th largest collected value
    if not 0 < within <= collected.size:
        return None
    position = collected.size - within
    value, collected_above, tied = order_statistics(collected, [position])[position]
    greater = above + collected_above
    if value == 0 or greater + tied <= count:
        return TopCut(count, total, float(value))
    tied_before, tied_within, seen = {}, {}, 0
    for start, values in inside:
        tied_before[start], tied_within[start] = seen, int(np.count_nonzero(values == value))
        seen += tied_within[start]
    return TopCut(count, total, float(value), count - greater, tied_before, tied_within)


def _cuts_in_memory(counts: list[int], total: int, magnitudes: torch.Tensor) -> list[TopCut]:
    flat, positions = magnitudes.reshape(-1), sorted({total - count for count in counts})
    if flat.device.type != "cpu":  # on an accelerator: its own selection, no copy to the host
        found = {}
        for position in positions:
            value = float(torch.kthvalue(flat, position + 1).values)
            found[position] = (value, int((flat > value).sum()), int((flat == value).sum()))
    else:  # two compiled histogram passes (numpy's partition copies the tensor and runs 3x slower), ties included
        found = order_statistics(flat.numpy(), positions)
    cuts = []
    for count in counts:
        value, above, tied = found[total - count]
        if value == 0 or above + tied == count:  # zeros add nothing, whichever of them is kept
            cuts.append(TopCut(count, total, value))
        else:
            cuts.append(TopCut(count, total, value, count - above, {0: 0}, {0: tied}))
    return cuts


_HIGH_BINS = 1 << 15  # the sign bit of a magnitude is 0: its top 16 bits are below 2^15
_LOW_BINS = 1 << 16


def _bin_of_rank(histogram: torch.Tensor, rank: int) -> tuple[int, int]:
    """The bin holding the `rank`-th largest element (1-based) and how many elements lie in higher bins."""
    from_top = histogram.flip(0).cumsum(0)
    index = int(torch.searchsorted(from_top, torch.tensor(rank, dtype=from_top.dtype)))
    found = histogram.numel() - 1 - index
    return found, int(from_top[index]) - int(histogram[found])


def _cuts_by_radix(counts: list[int], total: int, chunks: MagnitudeChunks) -> list[TopCut]:
    """Two histogram passes for every count (the top 16 bits, then the low 16 within each count's top bin), and a
    third where a tie straddles a cut."""
    high = torch.zeros(_HIGH_BINS, dtype=torch.int64)
    for _, magnitudes in chunks():
        bits = magnitudes.reshape(-1).view(torch.int32)
        high += torch.bincount((bits >> 16).cpu(), minlength=_HIGH_BINS)
    high_bins = [_bin_of_rank(high, count) for count in counts]
    low = {high_bin: torch.zeros(_LOW_BINS, dtype=torch.int64) for high_bin, _ in high_bins}
    for _, magnitudes in chunks():
        bits = magnitudes.reshape(-1).view(torch.int32)
        top = bits >> 16
        for high_bin, histogram in low.items():
            histogram += torch.bincount((bits[top == high_bin] & 0xFFFF).cpu(), minlength=_LOW_BINS)
    cuts, straddling = [], {}
    for count, (high_bin, above_high) in zip(counts, high_bins, strict=True):
        low_bin, above_low = _bin_of_rank(low[high_bin], count - above_high)
        value = float(torch.tensor([(high_bin << 16) | low_bin], dtype=torch.int32).view(torch.float32))
        above, tied = above_high + above_low, int(low[high_bin][low_bin])
        cuts.append(TopCut(count, total, value))
        if value != 0 and above + tied > count:
            straddling[count] = (value, above)
    if straddling:  # a tie straddles a cut: where the tied elements lie decides which stay
        values = {value for value, _ in straddling.values()}
        tied_within: dict[float, dict[int, int]] = {value: {} for value in values}
        for start, magnitudes in chunks():
            for value in values:
                tied_within[value][start] = int((magnitudes == value).sum())
        for index, count in enumerate(counts):
            if count in straddling:
                value, above = straddling[count]
                within, before, seen = tied_within[value], {}, 0
                for start, tied in within.items():
                    before[start], seen = seen, seen + tied
                cuts[index] = TopCut(count, total, value, count - above, before, dict(within))
    return cuts
