"""Packed micro-batches of a DP rank: every row once, fillers evening out ranks, tokens and positions per row."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from fapo_megatron.megatron.packing import packed_micro_batches, unpack

sys.path.insert(0, str(Path(__file__).parent))
from megatron_testlib import make_batch  # noqa: E402


def test_packed_micro_batches_cover_every_row_once_with_fillers():
    batch = make_batch()  # lengths 16 11 9 16 6 13 16 10
    seen, per_rank, fillers = [], [], 0
    for rank in range(3):
        items, longest = packed_micro_batches(batch, budget=30, dp=3, dp_rank=rank, multiple=2, device="cpu")
        per_rank.append(len(items))
        assert longest == max(item["tokens"].shape[1] for item in items)
        for item in items:
            rows = item["rows"]
            total = item["tokens"].shape[1]
            cu = item["packed_seq_params"].cu_seqlens_q.tolist()
            assert total % 2 == 0 and cu[-1] == total and cu[0] == 0
            if rows.tolist() == [-1]:
                assert item["response_mask"].sum() == 0
                fillers += 1
                continue
            seen += rows.tolist()
            lengths = batch.lengths[rows]
            assert int(lengths.sum()) <= 30 or len(rows) == 1
            assert cu[: len(rows) + 1] == [0, *lengths.cumsum(0).tolist()]
            # tokens and restarting positions come back in row layout
            rebuilt = unpack(item, item["tokens"])
            assert torch.equal(rebuilt, batch.tokens[rows, : rebuilt.shape[1]] * item["unpack_valid"])
            positions = unpack(item, item["position_ids"])
            assert torch.equal(positions[item["unpack_valid"]], torch.cat([torch.arange(n) for n in lengths]))
            assert torch.equal(item["response_mask"], batch.response_mask[rows, : rebuilt.shape[1]])
    assert sorted(seen) == list(range(len(batch)))
    assert len(set(per_rank)) == 1 and fillers == 1  # rank 0's one pack of 16 + 13 tokens gets a filler
