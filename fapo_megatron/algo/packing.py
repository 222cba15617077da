"""Token-budget bin packing of rollouts (pure functions, no torch): which rows share a micro-batch, and which
data-parallel rank trains which rows.

Padding every micro-batch to the longest row wastes most of a long-tailed batch's FLOPs; packing rows back to
back up to a token budget spends them on real tokens instead.
"""

from __future__ import annotations

import heapq


def first_fit_decreasing(lengths: list[int], budget: int) -> list[list[int]]:
    """Row indices grouped into bins whose lengths sum to at most `budget` (first-fit-decreasing); a row longer
    than the budget gets a bin of its own. Bins come out in order of creation, rows within a bin ascending."""
    if budget <= 0:
        raise ValueError(f"token budget {budget} must be > 0")
    bins: list[list[int]] = []
    loads: list[int] = []
    for row in sorted(range(len(lengths)), key=lambda r: (-lengths[r], r)):
        for index, load in enumerate(loads):
            if load + lengths[row] <= budget:
                bins[index].append(row)
                loads[index] += lengths[row]
                break
        else:
            bins.append([row])
            loads.append(lengths[row])
    return [sorted(rows) for rows in bins]


def balance_over_ranks(lengths: list[int], ranks: int) -> list[list[int]]:
    """Row indices split over `ranks` parts with near-equal token sums: longest row first to the least-loaded
    part (greedy LPT, within 4/3 of the optimum); ties go to the lower rank, so every caller gets the same split."""
    if ranks <= 0:
        raise ValueError(f"rank count {ranks} must be > 0")
    heap = [(0, rank) for rank in range(ranks)]
    parts: list[list[int]] = [[] for _ in range(ranks)]
    for row in sorted(range(len(lengths)), key=lambda r: (-lengths[r], r)):
        load, rank = heapq.heappop(heap)
        parts[rank].append(row)
        heapq.heappush(heap, (load + lengths[row], rank))
    return [sorted(rows) for rows in parts]
