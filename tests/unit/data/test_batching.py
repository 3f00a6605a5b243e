"""Packing: the bucketed best-fit decreasing of `pack_bins` against a plain reference."""

from __future__ import annotations

import bisect
import random

import pytest

from lorafleet.data.batching import pack_bins


def reference_pack_bins(lengths: list[int], max_length: int) -> list[list[int]]:
    """Best-fit decreasing the slow, obvious way: every open row kept in one list sorted by (free space, row)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []
    for i in order:
        n = lengths[i]
        j = bisect.bisect_left(free, (n, -1))
        if j == len(free):
            bins.append([i])
            bisect.insort(free, (max_length - n, len(bins) - 1))
        else:
            space, b = free.pop(j)
            bins[b].append(i)
            bisect.insort(free, (space - n, b))
    return bins


@pytest.mark.parametrize("seed", range(6))
def test_pack_bins_matches_the_reference(seed):
    rng = random.Random(seed)
    max_length = rng.choice([8, 64, 128, 1000])
    # Many ties (few distinct lengths) and exact fits, where the tie-breaking rules decide.
    lengths = [rng.choice([1, 2, max_length // 2, max_length, rng.randint(1, max_length)]) for _ in range(3000)]
    bins = pack_bins(lengths, max_length)
    assert bins == reference_pack_bins(lengths, max_length)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= max_length for b in bins)


def test_pack_bins_edges():
    assert pack_bins([], 8) == []
    with pytest.raises(ValueError, match="sample 1 has 9 tokens, more than max_length=8"):
        pack_bins([3, 9], 8)
