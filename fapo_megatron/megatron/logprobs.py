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
    chunk_tokens: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target), entropy), both [B, S] float32, of softmax(logits / temperature) over the full vocab.

    Without `entropy_grad` (the paper's runs: no entropy bonus) the fused path keeps one float32 copy of the
    logits instead of three; with it, every intermediate stays in the graph so the entropy is differentiable.
    With `chunk_tokens` > 0 both work `chunk_tokens` positions at a time and backward recomputes the softmax
    from the logits it keeps: float32 working memory of one chunk instead of the whole sequence.
    """
    if chunk_tokens:
        return _ChunkedLogProb.apply(logits_BSV, targets_BS, temperature, vocab_size, chunk_tokens, entropy_grad)
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


def _scaled_float_logits(logits_NV: torch.Tensor, temperature: float, start: int, vocab_size: int) -> torch.Tensor:
    """A float32 copy of logits / temperature with this rank's padded vocabulary rows excluded."""
    work = logits_NV.to(torch.float32, copy=True).div_(temperature)
    if start + work.shape[-1] > vocab_size:
        work[..., max(vocab_size - start, 0) :] = _EXCLUDED
    return work


def _exp_in_place(work: torch.Tensor, targets: torch.Tensor, start: int, tp_group) -> tuple[torch.Tensor, ...]:
    """Turn `work` (scaled float logits) into exp(logits - max) in place; returns (log p(target), entropy, the
    max, log Z of the shifted logits, sum of exp, target index into this rank's rows, target-in-this-rank mask)."""
    rows = work.shape[-1]
    tp_size = dist.get_world_size(tp_group)
    shift = work.max(dim=-1, keepdim=True).values
    if tp_size > 1:
        dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=tp_group)
    work.sub_(shift)
    local_target = targets - start
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
    return target_logit - log_z, entropy, shift.squeeze(-1), log_z, sum_exp, index, in_slice


class _FusedLogProb(torch.autograd.Function):
    """log softmax(logits / T)[target] over a TP-split vocabulary, with the entropy as a non-differentiable
    by-product. Forward overwrites its one float32 copy of the logits with the softmax and saves only that;
    backward turns it in place into d logp / d logits = (onehot(target) - softmax) / T (as megatron's
    vocab-parallel cross entropy does)."""

    @staticmethod
    def forward(ctx, logits_BSV, targets_BS, temperature, vocab_size):
        tp_group = parallel_state.get_tensor_model_parallel_group()
        start = parallel_state.get_tensor_model_parallel_rank() * logits_BSV.shape[-1]
        work = _scaled_float_logits(logits_BSV, temperature, start, vocab_size)
        logprobs, entropy, _, _, sum_exp, index, in_slice = _exp_in_place(work, targets_BS, start, tp_group)
        work.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(work, index, in_slice)
        ctx.temperature = temperature
        ctx.logits_dtype = logits_BSV.dtype
        ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprob_BS, _grad_entropy):
        softmax, index, in_slice = ctx.saved_tensors
        grad = softmax.mul_(-grad_logprob_BS.unsqueeze(-1))
        grad.scatter_add_(-1, index, (grad_logprob_BS * in_slice).unsqueeze(-1))
        grad.div_(ctx.temperature)
        return grad.to(ctx.logits_dtype), None, None, None


class _ChunkedLogProb(torch.autograd.Function):
    """The same values `chunk` positions at a time. Forward keeps the logits (already resident: the output
    layer made them) and each position's log Z and entropy; backward recomputes one chunk's softmax p at a time:
    d logp / d x = onehot(target) - p and d H / d x = -p (log p + H), for x = logits / T, then / T. The entropy
    gradient is taken only with `entropy_grad`."""

    @staticmethod
    def forward(ctx, logits_BSV, targets_BS, temperature, vocab_size, chunk, entropy_grad):
        tp_group = parallel_state.get_tensor_model_parallel_group()
        rows = logits_BSV.shape[-1]
        start = parallel_state.get_tensor_model_parallel_rank() * rows
        logits, targets = logits_BSV.reshape(-1, rows), targets_BS.reshape(-1)
        logprobs, entropy, shift, log_z = (torch.empty(targets_BS.shape, device=logits.device) for _ in range(4))
        for first in range(0, len(targets), chunk):
            part = slice(first, first + chunk)
            work = _scaled_float_logits(logits[part], temperature, start, vocab_size)
            values = _exp_in_place(work, targets[part], start, tp_group)[:4]
            del work
            for whole, value in zip((logprobs, entropy, shift, log_z), values):
                whole.view(-1)[part] = value
        ctx.save_for_backward(logits_BSV, targets_BS, shift, log_z, entropy)
        ctx.settings = temperature, vocab_size, chunk, start, entropy_grad
        if not entropy_grad:
            ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprob_BS, grad_entropy_BS):
        logits_BSV, targets_BS, shift_BS, log_z_BS, entropy_BS = ctx.saved_tensors
        temperature, vocab_size, chunk, start, entropy_grad = ctx.settings
        rows = logits_BSV.shape[-1]
        logits, targets = logits_BSV.reshape(-1, rows), targets_BS.reshape(-1)
        shift, log_z, entropy = shift_BS.reshape(-1), log_z_BS.reshape(-1), entropy_BS.reshape(-1)
        grad_logprob = grad_logprob_BS.reshape(-1)
        grad_entropy = grad_entropy_BS.reshape(-1) if entropy_grad and grad_entropy_BS is not None else None
        grad = torch.empty_like(logits)
        for first in range(0, len(targets), chunk):
            part = slice(first, first + chunk)
            log_p = _scaled_float_logits(logits[part], temperature, start, vocab_size)
            log_p.sub_(shift[part, None]).sub_(log_z[part, None])
            p = log_p.exp()
            if grad_entropy is not None:
                # -p (log p + H) g_H - p g_logp, reusing log_p's storage
                log_p.add_(entropy[part, None]).mul_(grad_entropy[part, None]).add_(grad_logprob[part, None])
                step = log_p.mul_(p).neg_()
            else:
                step = p.mul_(-grad_logprob[part, None])
            local_target = targets[part] - start
            in_slice = (local_target >= 0) & (local_target < rows)
            index = local_target.clamp(0, rows - 1).unsqueeze(-1)
            step.scatter_add_(-1, index, (grad_logprob[part] * in_slice).unsqueeze(-1))
            grad[part] = step.div_(temperature)
        return grad.view_as(logits_BSV), None, None, None, None, None
