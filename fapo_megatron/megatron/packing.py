"""Micro-batches of one data-parallel rank, either fixed row blocks padded to the longest row or rows packed back
to back up to a token budget (megatron's `thd` format: one [1, T] row and `PackedSeqParams.cu_seqlens`).

Every micro-batch is a dict: `tokens` / `position_ids` [b, T] are the model's input; the TrainBatch fields in row
layout ([n, L], L the longest of its n rows) feed the loss unchanged, so a packed step computes exactly the padded
step's loss. A packed item also has `unpack_index` / `unpack_valid` [n, L] (per-token values of the [1, T] pack
-> row layout) and `packed_seq_params`. `rows` [n] are the rows' indices in the batch (-1: a filler row).

Packed rows go to DP ranks balanced by token count; every rank runs the same number of micro-batches (schedules
and gradient reduction need it), ranks with fewer bins get fillers whose response mask is all zero.
"""

from __future__ import annotations

import dataclasses

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from fapo_megatron.algo.batch import TrainBatch
from fapo_megatron.algo.packing import balance_over_ranks, first_fit_decreasing


def _row_layout(chunk: TrainBatch) -> dict:
    return {field.name: getattr(chunk, field.name) for field in dataclasses.fields(chunk)}


def padded_micro_batches(
    batch: TrainBatch, *, rows_per_micro_batch: int, dp: int, dp_rank: int, multiple: int, device
) -> tuple[list[dict], int]:
    """Contiguous DP shard in blocks of `rows_per_micro_batch` rows, all padded to the batch's longest row (a
    multiple of `multiple`); rows are added (uncounted) so that the DP x micro-batch grid fills. -> (items, S)."""
    batch = _pad_columns(batch.trimmed(multiple), multiple)
    real = len(batch)
    grid = dp * rows_per_micro_batch
    if real % grid:
        batch = _pad_rows(batch, grid - real % grid)
    index = torch.arange(len(batch))
    index[real:] = -1
    per_rank = len(batch) // dp
    local = batch.shard(dp_rank, dp).to(device)
    local_rows = index[dp_rank * per_rank : (dp_rank + 1) * per_rank]
    seq = local.tokens.shape[1]
    items = []
    for start in range(0, len(local), rows_per_micro_batch):
        chunk = local.select(slice(start, start + rows_per_micro_batch))
        item = _row_layout(chunk)
        item["position_ids"] = torch.arange(seq, device=device).expand(len(chunk), seq)
        item["rows"] = local_rows[start : start + rows_per_micro_batch]
        items.append(item)
    return items, seq


def packed_micro_batches(
    batch: TrainBatch, *, budget: int, dp: int, dp_rank: int, multiple: int, device
) -> tuple[list[dict], int]:
    """This rank's packs of at most `budget` tokens (a longer row alone), each padded to a multiple of `multiple`
    (TP sequence parallelism splits the pack); -> (items, the longest pack's T)."""
    lengths = batch.lengths.tolist()
    plans = []
    for rows in balance_over_ranks(lengths, dp):
        bins = first_fit_decreasing([lengths[row] for row in rows], budget)
        plans.append([[rows[i] for i in members] for members in bins])
    count = max(len(plan) for plan in plans)
    items = [_pack(batch.select(rows), torch.tensor(rows), multiple, device) for rows in plans[dp_rank]]
    items += [_pack(_filler(batch, multiple), torch.tensor([-1]), multiple, device)] * (count - len(items))
    longest = max(item["tokens"].shape[1] for item in items)
    return items, longest


def _pack(rows: TrainBatch, indices: torch.Tensor, multiple: int, device) -> dict:
    rows = rows.trimmed().to(device)
    lengths = rows.lengths
    total = int(lengths.sum())
    padded = -(-total // multiple) * multiple
    width = rows.tokens.shape[1]
    columns = torch.arange(width, device=device)
    valid = columns[None, :] < lengths[:, None]
    offsets = torch.cumsum(lengths, 0) - lengths
    tokens = torch.zeros(1, padded, dtype=rows.tokens.dtype, device=device)
    tokens[0, :total] = rows.tokens[valid]
    positions = torch.zeros(1, padded, dtype=torch.long, device=device)
    positions[0, :total] = columns.expand_as(valid)[valid]
    segments = lengths.tolist() + ([padded - total] if padded > total else [])
    cu_seqlens = torch.tensor([0, *torch.tensor(segments).cumsum(0).tolist()], dtype=torch.int32, device=device)
    item = _row_layout(rows)
    item.update(
        tokens=tokens,
        position_ids=positions,
        rows=indices,
        unpack_index=torch.where(valid, offsets[:, None] + columns[None, :], 0),
        unpack_valid=valid,
        packed_seq_params=PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=cu_seqlens,
            cu_seqlens_kv=cu_seqlens,
            max_seqlen_q=max(segments),
            max_seqlen_kv=max(segments),
        ),
    )
    return item


def unpack(item: dict, packed_1T: torch.Tensor) -> torch.Tensor:
    """Per-token values of a pack [1, T] (or of padded rows, returned as they are) in row layout [n, L]."""
    if "unpack_index" not in item:
        return packed_1T
    return packed_1T[0][item["unpack_index"]] * item["unpack_valid"]


def _filler(batch: TrainBatch, length: int) -> TrainBatch:
    """One row of `length` tokens with nothing counted: a rank's missing micro-batch."""
    per_token = {
        name: torch.zeros(1, length)
        for name in ("old_logprobs", "rollout_logprobs", "ref_logprobs")
        if getattr(batch, name) is not None
    }
    return TrainBatch(
        tokens=torch.zeros(1, length, dtype=batch.tokens.dtype),
        lengths=torch.tensor([length]),
        response_mask=torch.zeros(1, length),
        advantages=torch.zeros(1),
        group_ids=torch.tensor([-1]),
        **per_token,
    )


def _pad_rows(batch: TrainBatch, extra: int) -> TrainBatch:
    """Append `extra` copies of the last row with nothing counted (fills the DP x micro-batch grid)."""
    index = torch.cat([torch.arange(len(batch)), torch.full((extra,), len(batch) - 1)])
    padded = batch.select(index)
    padded.response_mask[len(batch) :] = 0
    return padded


def _pad_columns(batch: TrainBatch, multiple: int) -> TrainBatch:
    extra = -batch.tokens.shape[1] % multiple
    if extra == 0:
        return batch
    return batch._map(lambda t: torch.nn.functional.pad(t, (0, extra)) if t.dim() == 2 else t)
