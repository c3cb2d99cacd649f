"""Which samples share a micro-batch. Three modes (data.packing):

- off: samples right-padded to the longest in the micro-batch.
- padding_free: the same micro-batches, concatenated into one row (positions restart per sample).
- bins: whole samples are placed into bins of `pack_length` tokens (best-fit decreasing), and a
  micro-batch is `micro_batch_size` bins, one row each: every forward pass sees about the same number
  of tokens, and attention cost stays rows x pack_length^2 instead of (rows x pack_length)^2.

A sample is never split across bins and never attends to another (collate restarts positions).
"""

from __future__ import annotations

from bisect import bisect_left, insort


def plan_bins(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: each sample, longest first, goes into the fullest bin it still fits.
    Deterministic for given lengths; every index lands in exactly one bin."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep data order
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, bin index), sorted; full bins leave the list
    for i in order:
        need = lengths[i]
        if need > capacity:
            raise ValueError(f"sample {i} has {need} tokens, more than the bin capacity {capacity}")
        k = bisect_left(free, (need, -1))
        if k == len(free):
            bins.append([i])
            space, b = capacity - need, len(bins) - 1
        else:
            space, b = free.pop(k)
            bins[b].append(i)
            space -= need
        if space > 0:
            insort(free, (space, b))
    return bins


def units(lengths: list[int], mode: str, pack_length: int) -> list[list[int]]:
    """The units an epoch shuffles and deals out: one sample each, or one bin each."""
    if mode == "bins":
        return plan_bins(lengths, pack_length)
    return [[i] for i in range(len(lengths))]


def packing_stats(lengths: list[int], mode: str, pack_length: int, bins: list[list[int]] | None = None) -> dict:
    """What the packing mode does to this data: bins and how full they are (1.0 = no wasted slot)."""
    if mode != "bins" or not lengths:
        return {"mode": mode}
    bins = bins if bins is not None else plan_bins(lengths, pack_length)
    return {"mode": mode, "pack_length": pack_length, "bins": len(bins),
            "samples_per_bin": round(len(lengths) / len(bins), 2),
            "bin_fill": round(sum(lengths) / (len(bins) * pack_length), 4)}
