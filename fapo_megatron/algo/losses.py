"""Token-level PPO clipped policy loss (clip-higher, dual-clip) with optional KL, entropy and TIS terms.

Legend: B = sequences (rollouts) in this call, T = response tokens (padded). `mask` [B, T] is 1 on real
response tokens. Log-probs are of the sampled tokens; `logprobs` carries the gradient, every other input is
treated as a constant.

Micro-batching: a mini-batch is split into micro-batches (and data-parallel ranks). Pass the whole
mini-batch's `num_tokens` (token-mean) or `num_sequences` (seq-mean-*) to every call, and the SUM of the
calls' losses equals the loss of the mini-batch computed in one call. When they are None, this call's own
counts are used (the call is the whole mini-batch).
"""

from __future__ import annotations

import torch

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")
KL_TYPES = ("k1", "k3")
_LOG_RATIO_BOUND = 20.0  # keeps exp() finite for wildly off-policy tokens


def _normaliser(given: int | float | torch.Tensor | None, local: torch.Tensor, name: str) -> torch.Tensor:
    if given is None:
        return local.clamp(min=1.0)
    given = torch.as_tensor(given, dtype=local.dtype, device=local.device)
    if not bool(given > 0):
        raise ValueError(f"{name}={given.item()} must be > 0 (the mini-batch's global count)")
    return given


def aggregate_loss(
    values: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    *,
    num_tokens: int | float | torch.Tensor | None = None,
    num_sequences: int | float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce per-token `values` [B, T] to a scalar over `mask`.

    token-mean: sum of all masked values / num_tokens. seq-mean-token-sum: per-sequence sum, summed over
    sequences / num_sequences. seq-mean-token-mean: per-sequence mean over its own tokens, summed over
    sequences / num_sequences. Sequences without tokens count for nothing (local counts skip them).
    """
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode={mode!r}: expected one of {LOSS_AGG_MODES}")
    mask = mask.to(values.dtype)
    masked = values * mask
    if mode == "token-mean":
        return masked.sum() / _normaliser(num_tokens, mask.sum(), "num_tokens")
    tokens_per_sequence = mask.sum(dim=-1)
    per_sequence = masked.sum(dim=-1)
    if mode == "seq-mean-token-mean":
        per_sequence = per_sequence / tokens_per_sequence.clamp(min=1.0)
    local_sequences = (tokens_per_sequence > 0).to(values.dtype).sum()
    return per_sequence.sum() / _normaliser(num_sequences, local_sequences, "num_sequences")


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kl_type: str = "k3") -> torch.Tensor:
    """Per-token KL(policy || reference) estimate: k1 = logp - ref, k3 = exp(ref - logp) - (ref - logp) - 1."""
    if kl_type == "k1":
        return logprobs - ref_logprobs
    if kl_type == "k3":
        log_ratio = (ref_logprobs - logprobs).clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
        return log_ratio.exp() - log_ratio - 1.0
    raise ValueError(f"kl_type={kl_type!r}: expected one of {KL_TYPES}")


def _check_inputs(logprobs, old_logprobs, advantages, mask, optional: dict[str, torch.Tensor | None]) -> None:
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, T], got shape {tuple(logprobs.shape)}")
    shape = logprobs.shape
    for name, tensor in {"old_logprobs": old_logprobs, "mask": mask, **optional}.items():
        if tensor is not None and tensor.shape != shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(shape)} like logprobs")
    if advantages.shape not in (shape, shape[:1]):
        raise ValueError(f"advantages has shape {tuple(advantages.shape)}, expected [B]={shape[0]} or {tuple(shape)}")


def _check_options(clip_low, clip_high, dual_clip_c, kl_type, missing_inputs: dict[str, bool]) -> None:
    if not (0.0 < clip_low < 1.0 and clip_high > 0.0):
        raise ValueError(f"clip_low={clip_low} must be in (0, 1) and clip_high={clip_high} > 0")
    if dual_clip_c != 0.0 and dual_clip_c <= 1.0:
        raise ValueError(f"dual_clip_c={dual_clip_c} must be > 1 (or 0 to disable dual-clip)")
    if kl_type not in KL_TYPES:
        raise ValueError(f"kl_type={kl_type!r}: expected one of {KL_TYPES}")
    for message, missing in missing_inputs.items():
        if missing:
            raise ValueError(message)


def _clipped_surrogate(log_ratio, advantages, clip_low, clip_high, dual_clip_c):
    """Per-token PPO-clip loss with dual-clip, and where the clip and the dual-clip bind (bool masks)."""
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    clip_active = clipped > unclipped
    negative = advantages < 0
    dual_active = torch.zeros_like(negative)
    if dual_clip_c > 0.0:
        dual_bound = -advantages * dual_clip_c
        dual_active = negative & (per_token > dual_bound)
        per_token = torch.where(negative, torch.minimum(per_token, dual_bound), per_token)
    return per_token, clip_active, dual_active


def _masked_mean(values: torch.Tensor, mask: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    return ((values * mask).sum() / count.clamp(min=1.0)).detach()


def ppo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip_c: float = 10.0,
    loss_agg_mode: str = "token-mean",
    num_tokens: int | float | torch.Tensor | None = None,
    num_sequences: int | float | torch.Tensor | None = None,
    rollout_logprobs: torch.Tensor | None = None,
    tis_cap: float = 0.0,
    kl_coef: float = 0.0,
    kl_type: str = "k3",
    ref_logprobs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clip loss of one (micro-)batch and its metrics.

    Per token, with ratio = exp(logprobs - old_logprobs) and advantage A:
        l = max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high)),
        and where A < 0 with dual-clip on: l = min(l, -A * dual_clip_c).
    With `tis_cap` > 0, l is multiplied by min(exp(old_logprobs - rollout_logprobs), tis_cap) (truncated
    importance sampling for the rollout-engine/trainer mismatch; a constant weight). The loss is
    agg(l) + kl_coef * agg(kl) - entropy_coef * agg(entropy), each agg by `loss_agg_mode` (see module doc).

    Metrics (detached 0-dim tensors):
      * token means over this call's masked tokens - combine micro-batches weighted by `local_num_tokens`:
        pg_clipfrac (clip binds, upper or lower), pg_clipfrac_lower (dual-clip binds), ppo_kl (old -> new,
        mean of old - new), and when their inputs are given: entropy, kl, tis_ratio_mean, tis_capped_frac,
        rollout_logprob_abs_diff (|old - rollout|, trainer vs rollout engine);
      * tis_ratio_max: combine with max;
      * local_num_tokens, local_num_sequences (sequences with tokens): combine by sum;
      * pg_loss, kl_loss, entropy_loss: this call's share of each aggregated term: combine by sum.
    """
    _check_inputs(
        logprobs,
        old_logprobs,
        advantages,
        mask,
        {"rollout_logprobs": rollout_logprobs, "ref_logprobs": ref_logprobs, "entropy": entropy},
    )
    missing_inputs = {
        "tis_cap > 0 needs rollout_logprobs (rollout engine's log-probs)": tis_cap > 0 and rollout_logprobs is None,
        "kl_coef > 0 needs ref_logprobs (the reference policy's log-probs)": kl_coef > 0 and ref_logprobs is None,
        "entropy_coef > 0 needs entropy (per-token)": entropy_coef > 0 and entropy is None,
    }
    _check_options(clip_low, clip_high, dual_clip_c, kl_type, missing_inputs)
    mask = mask.to(logprobs.dtype)
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(logprobs)
    advantages = advantages.detach().to(logprobs.dtype)
    old_logprobs = old_logprobs.detach()
    agg = dict(mode=loss_agg_mode, num_tokens=num_tokens, num_sequences=num_sequences)
    local_tokens = mask.sum()

    log_ratio = (logprobs - old_logprobs).clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
    per_token, clip_active, dual_active = _clipped_surrogate(log_ratio, advantages, clip_low, clip_high, dual_clip_c)
    metrics = {
        "pg_clipfrac": _masked_mean(clip_active.to(mask.dtype), mask, local_tokens),
        "pg_clipfrac_lower": _masked_mean(dual_active.to(mask.dtype), mask, local_tokens),
        "ppo_kl": _masked_mean(-log_ratio, mask, local_tokens),
    }
    if rollout_logprobs is not None:
        engine_gap = old_logprobs - rollout_logprobs.detach()
        metrics["rollout_logprob_abs_diff"] = _masked_mean(engine_gap.abs(), mask, local_tokens)
    if tis_cap > 0.0:
        tis_ratio = engine_gap.clamp(max=_LOG_RATIO_BOUND).exp()
        per_token = per_token * tis_ratio.clamp(max=tis_cap)
        metrics["tis_ratio_mean"] = _masked_mean(tis_ratio, mask, local_tokens)
        metrics["tis_ratio_max"] = torch.where(mask > 0, tis_ratio, 0.0).max().detach()
        metrics["tis_capped_frac"] = _masked_mean((tis_ratio > tis_cap).to(mask.dtype), mask, local_tokens)

    loss = aggregate_loss(per_token, mask, **agg)
    metrics["pg_loss"] = loss.detach()
    if ref_logprobs is not None:
        kl = kl_penalty(logprobs, ref_logprobs.detach(), kl_type)
        metrics["kl"] = _masked_mean(kl, mask, local_tokens)
        if kl_coef > 0.0:
            kl_loss = aggregate_loss(kl, mask, **agg)
            metrics["kl_loss"] = kl_loss.detach()
            loss = loss + kl_coef * kl_loss
    if entropy is not None:
        metrics["entropy"] = _masked_mean(entropy, mask, local_tokens)
        if entropy_coef > 0.0:
            entropy_loss = aggregate_loss(entropy, mask, **agg)
            metrics["entropy_loss"] = entropy_loss.detach()
            loss = loss - entropy_coef * entropy_loss
    metrics["local_num_tokens"] = local_tokens.detach()
    metrics["local_num_sequences"] = (mask.sum(dim=-1) > 0).to(mask.dtype).sum()
    return loss, metrics
