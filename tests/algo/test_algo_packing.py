"""Token-budget bin packing (first-fit-decreasing) and token-balanced data parallelism."""

from __future__ import annotations

import itertools

import pytest

from fapo_megatron.algo.packing import balance_over_ranks, first_fit_decreasing


def test_first_fit_decreasing_fills_bins_and_isolates_long_rows():
    lengths = [5, 9, 3, 30, 7, 2, 8]
    bins = first_fit_decreasing(lengths, 12)
    assert sorted(itertools.chain(*bins)) == list(range(len(lengths)))
    assert [3] in bins  # longer than the budget: alone
    assert all(sum(lengths[r] for r in rows) <= 12 for rows in bins if rows != [3])
    # FFD by hand: 30 | 9+3 | 8+2 | 7+5
    assert sorted(bins) == sorted([[3], [1, 2], [5, 6], [0, 4]])
    with pytest.raises(ValueError, match="budget 0"):
        first_fit_decreasing(lengths, 0)


def test_balance_over_ranks_evens_token_counts():
    lengths = [100, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10]
    parts = balance_over_ranks(lengths, 2)
    assert sorted(itertools.chain(*parts)) == list(range(len(lengths)))
    assert sorted(sum(lengths[r] for r in part) for part in parts) == [100, 100]
    assert balance_over_ranks(lengths, 2) == parts  # the same split on every rank
    assert balance_over_ranks([4], 3) == [[0], [], []]
