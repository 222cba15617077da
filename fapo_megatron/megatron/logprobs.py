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
    logits_BSV: torch.Tensor,
    targets_BS: torch.Tensor,
    *,
    temperature: float,
    vocab_size: int,
    entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target), entropy), both [B, S] float32, of softmax(logits / temperature) over the full vocab.

    Without `entropy_grad` (the paper's runs: no entropy bonus) the fused path keeps one float32 copy of the
    logits instead of three; with it, every intermediate stays in the graph so the entropy is differentiable.
    """
    if not entropy_grad:
        return _FusedLogProb.apply(logits_BSV, targets_BS, temperature, vocab_size)
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


class _FusedLogProb(torch.autograd.Function):
    """log softmax(logits / T)[target] over a TP-split vocabulary, with the entropy as a non-differentiable
    by-product. Forward overwrites its one float32 copy of the logits with the softmax and saves only that;
    backward turns it in place into d logp / d logits = (onehot(target) - softmax) / T (as megatron's
    vocab-parallel cross entropy does)."""

    @staticmethod
    def forward(ctx, logits_BSV, targets_BS, temperature, vocab_size):
        tp_group = parallel_state.get_tensor_model_parallel_group()
        tp_size = dist.get_world_size(tp_group)
        rows = logits_BSV.shape[-1]
        start = parallel_state.get_tensor_model_parallel_rank() * rows
        work = logits_BSV.to(torch.float32, copy=True).div_(temperature)
        if start + rows > vocab_size:
            work[..., max(vocab_size - start, 0) :] = _EXCLUDED
        shift = work.max(dim=-1, keepdim=True).values
        if tp_size > 1:
            dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=tp_group)
        work.sub_(shift)
        local_target = targets_BS - start
        in_slice = (local_target >= 0) & (local_target < rows)
        index = local_target.clamp(0, rows - 1).unsqueeze(-1)
        target_logit = work.gather(-1, index).squeeze(-1) * in_slice
        work.exp_()
        sums = torch.stack([work.sum(dim=-1), torch.xlogy(work, work).sum(dim=-1), target_logit])
        if tp_size > 1:
            dist.all_reduce(sums, group=tp_group)
        sum_exp, sum_e_log_e, target_logit = sums
        log_z = sum_exp.log()
        entropy = log_z - sum_e_log_e / sum_exp
        work.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(work, index, in_slice)
        ctx.temperature = temperature
        ctx.logits_dtype = logits_BSV.dtype
        ctx.mark_non_differentiable(entropy)
        return target_logit - log_z, entropy

    @staticmethod
    def backward(ctx, grad_logprob_BS, _grad_entropy):
        softmax, index, in_slice = ctx.saved_tensors
        grad = softmax.mul_(-grad_logprob_BS.unsqueeze(-1))
        grad.scatter_add_(-1, index, (grad_logprob_BS * in_slice).unsqueeze(-1))
        grad.div_(ctx.temperature)
        return grad.to(ctx.logits_dtype), None, None, None
