"""FAPO rewards: outcome reward, flaw penalty, unavailable-verdict policy and DAPO overlong shaping.

Legend: N = rollouts in the batch. A rollout's reward is

    R = +1 if its final answer is correct else -1           (RLVR outcome)
        - lam if correct and the GenRM says flawed          (FAPO flaw penalty)
        + overlong_penalty(length)                          (DAPO shaping, <= 0)

The GenRM is only asked about correct rollouts, so `flawed` and `available` matter only where `correct`.
A verdict that could not be had is never silently read as clean: it is counted and handled by an explicit policy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

UNAVAILABLE_POLICIES = ("treat_as_clean", "treat_as_flawed", "drop", "fail")


class VerdictUnavailableError(RuntimeError):
    """Raised under the `fail` policy when some correct rollout has no GenRM verdict."""


@dataclass
class RewardResult:
    """Rewards of one batch and the counts a trainer logs.

    `rewards` is NaN where `keep` is False (the `drop` policy): a dropped rollout has no defined reward and
    must be excluded (pass `keep` as the advantage mask); NaN makes a caller that forgets this fail loudly.
    """

    rewards: torch.Tensor
    """float [N]: outcome + flaw penalty + overlong shaping; NaN where dropped."""
    keep: torch.Tensor
    """bool [N]: False for rollouts dropped by the `drop` policy."""
    outcome: torch.Tensor
    """float [N]: the outcome-only reward (+1 / -1), for logging."""
    penalized: torch.Tensor
    """bool [N]: rollouts given the -lam penalty (verdict flawed, or no verdict under treat_as_flawed)."""
    num_flawed: int
    """Correct rollouts whose available verdict is flawed."""
    num_unavailable: int
    """Correct rollouts without a verdict (before the policy is applied)."""
    num_dropped: int
    """Rollouts with keep=False."""


def _check_bool_vector(name: str, tensor: torch.Tensor, num: int | None = None) -> None:
    if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.bool or tensor.dim() != 1:
        got = f"{tensor.dtype} {tuple(tensor.shape)}" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise TypeError(f"{name} must be a 1-D bool tensor, got {got}")
    if num is not None and tensor.numel() != num:
        raise ValueError(f"{name} has {tensor.numel()} entries, expected {num} (one per rollout)")


def overlong_penalty(
    lengths: torch.Tensor, max_response_tokens: int, buffer: int, factor: float = 1.0
) -> torch.Tensor:
    """DAPO soft overlong penalty: 0 up to `max_response_tokens - buffer`, then linear down to -factor at the limit.

    penalty(L) = min(-(L - (L_max - B)) / B, 0) * factor. With buffer 0 the shaping is off (all zeros).
    """
    if lengths.dim() != 1:
        raise ValueError(f"lengths must be 1-D (one per rollout), got shape {tuple(lengths.shape)}")
    if max_response_tokens <= 0:
        raise ValueError(f"max_response_tokens={max_response_tokens} must be > 0")
    if not 0 <= buffer <= max_response_tokens:
        raise ValueError(f"overlong buffer={buffer} must be in [0, max_response_tokens={max_response_tokens}]")
    if factor < 0:
        raise ValueError(f"overlong factor={factor} must be >= 0")
    if bool((lengths < 0).any()):
        raise ValueError("lengths has negative entries")
    if buffer == 0:
        return torch.zeros(lengths.shape, dtype=torch.float32, device=lengths.device)
    expected_start = max_response_tokens - buffer
    penalty = -(lengths.to(torch.float64) - expected_start) / buffer
    return (penalty.clamp(max=0.0) * factor).to(torch.float32)


def fapo_rewards(
    correct: torch.Tensor,
    flawed: torch.Tensor,
    available: torch.Tensor | None = None,
    *,
    lam: float = 1.0,
    unavailable_policy: str = "drop",
    overlong: torch.Tensor | None = None,
) -> RewardResult:
    """FAPO reward of N rollouts from bool tensors `correct`, `flawed` and `available` (default: all available).

    `unavailable_policy` decides what a correct rollout without a verdict gets: `treat_as_clean` (no penalty),
    `treat_as_flawed` (-lam), `drop` (keep=False, reward NaN) or `fail` (raise VerdictUnavailableError).
    Plain GRPO is `flawed` all False. `overlong` is the float [N] shaping term (`overlong_penalty`) added to
    each reward; the caller computes it once, so the reward and its logged share are the same numbers.
    """
    _check_bool_vector("correct", correct)
    num = correct.numel()
    _check_bool_vector("flawed", flawed, num)
    if available is None:
        available = torch.ones_like(correct)
    _check_bool_vector("available", available, num)
    if unavailable_policy not in UNAVAILABLE_POLICIES:
        raise ValueError(f"unavailable_policy={unavailable_policy!r}: expected one of {UNAVAILABLE_POLICIES}")
    if lam < 0:
        raise ValueError(f"lam={lam} must be >= 0")

    unavailable = correct & ~available
    num_unavailable = int(unavailable.sum())
    if unavailable_policy == "fail" and num_unavailable:
        raise VerdictUnavailableError(
            f"{num_unavailable} of {int(correct.sum())} correct rollouts have no GenRM verdict "
            "(genrm.unavailable_policy=fail)"
        )
    verdict_flawed = correct & available & flawed
    penalized = verdict_flawed | (unavailable & (unavailable_policy == "treat_as_flawed"))
    keep = ~unavailable if unavailable_policy == "drop" else torch.ones_like(correct)

    outcome = torch.where(correct, 1.0, -1.0).to(torch.float32)
    rewards = outcome - lam * penalized.to(torch.float32)
    if overlong is not None:
        if overlong.shape != correct.shape:
            raise ValueError(f"overlong has shape {tuple(overlong.shape)}, expected {tuple(correct.shape)}")
        rewards = rewards + overlong
    rewards = torch.where(keep, rewards, torch.nan)
    return RewardResult(
        rewards=rewards,
        keep=keep,
        outcome=outcome,
        penalized=penalized,
        num_flawed=int(verdict_flawed.sum()),
        num_unavailable=num_unavailable,
        num_dropped=int((~keep).sum()),
    )
