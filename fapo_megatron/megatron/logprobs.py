"""Token log-probs and entropy from vocab-parallel logits (each TP rank holds a slice of the vocabulary).

Legend: B batch, S sequence, V_r this rank's vocabulary rows. The three all-reduces run over the TP group;
the max is a constant shift, the sums use megatron's reduce (all-reduce forward, identity backward), which is
the exact gradient of a sum over ranks. Padded vocabulary rows (>= the real vocabulary) are excluded.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

_EXCLUDED = -1e30  # finite, so that p * logit stays 0 * (-1e30) = 0 in the entropy


def vocab_parallel_logprobs(
    logits_BSV: torch.Tensor, targets_BS: torch.Tensor, *, temperature: float, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target), entropy), both [B, S] float32, of softmax(logits / temperature) over the full vocab."""
    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    rows = logits_BSV.shape[-1]
    start = tp_rank * rows
    logits = logits_BSV.float() / temperature
    if start + rows > vocab_size:
        padded = torch.arange(start, start + rows, device=logits.device) >= vocab_size
        logits = logits.masked_fill(padded, _EXCLUDED)

    shift = logits.detach().max(dim=-1, keepdim=True).values
    if dist.get_world_size(tp_group) > 1:
        dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=tp_group)
    shifted = logits - shift
    exp = shifted.exp()
    sum_exp = reduce_from_tensor_model_parallel_region(exp.sum(dim=-1))
    log_z = sum_exp.log()

    local_target = targets_BS - start
    in_slice = (local_target >= 0) & (local_target < rows)
    picked = shifted.gather(-1, local_target.clamp(0, rows - 1).unsqueeze(-1)).squeeze(-1)
    target_logit = reduce_from_tensor_model_parallel_region(picked * in_slice)
    logprobs = target_logit - log_z

    probs_dot_logits = reduce_from_tensor_model_parallel_region((exp * shifted).sum(dim=-1)) / sum_exp
    entropy = log_z - probs_dot_logits
    return logprobs, entropy


def align_to_tokens(per_position_BS: torch.Tensor) -> torch.Tensor:
    """Values computed at position t-1 about token t, moved to column t (column 0 gets 0)."""
    return torch.nn.functional.pad(per_position_BS[:, :-1], (1, 0))
