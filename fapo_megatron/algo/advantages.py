"""Group-relative (GRPO) advantages: each rollout's reward against the other rollouts of the same prompt.

Legend: N = rollouts in the batch, G = distinct groups (prompts). One advantage per rollout; the trainer
broadcasts it over the rollout's response tokens.
"""

from __future__ import annotations

import torch


def grpo_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    eps: float = 1e-6,
    norm_by_std: bool = True,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Advantage (r - mean) / (std + eps) within each group, unbiased std; `norm_by_std=False` gives r - mean.

    `group_ids` (int [N]) names each rollout's group, in any order and with any values. Rollouts with
    `mask` False (e.g. dropped for a missing GenRM verdict) get 0 and do not enter their group's mean or std.
    A group with fewer than two kept rollouts gives 0: there is nothing to compare against.
    """
    if rewards.dim() != 1 or not rewards.is_floating_point():
        raise ValueError(f"rewards must be a 1-D float tensor, got {rewards.dtype} {tuple(rewards.shape)}")
    if group_ids.shape != rewards.shape or group_ids.is_floating_point() or group_ids.dtype == torch.bool:
        raise ValueError(
            f"group_ids must be an integer tensor of shape {tuple(rewards.shape)}, "
            f"got {group_ids.dtype} {tuple(group_ids.shape)}"
        )
    if mask is None:
        mask = torch.ones_like(rewards, dtype=torch.bool)
    if mask.shape != rewards.shape or mask.dtype != torch.bool:
        raise ValueError(
            f"mask must be a bool tensor of shape {tuple(rewards.shape)}, got {mask.dtype} {tuple(mask.shape)}"
        )
    if bool(torch.isnan(rewards[mask]).any()):
        raise ValueError("rewards has NaN at kept rollouts (mask True); dropped rollouts must be masked out")

    _, group_index = torch.unique(group_ids, return_inverse=True)
    num_groups = int(group_index.max()) + 1 if group_index.numel() else 0
    values = torch.where(mask, rewards.to(torch.float64), 0.0)
    weights = mask.to(torch.float64)

    counts = torch.zeros(num_groups, dtype=torch.float64, device=rewards.device).index_add_(0, group_index, weights)
    sums = torch.zeros_like(counts).index_add_(0, group_index, values)
    means = sums / counts.clamp(min=1.0)
    deviations = torch.where(mask, values - means[group_index], 0.0)
    if norm_by_std:
        squares = torch.zeros_like(counts).index_add_(0, group_index, deviations.square())
        stds = (squares / (counts - 1.0).clamp(min=1.0)).sqrt()
        deviations = deviations / (stds[group_index] + eps)
    comparable = mask & (counts[group_index] > 1.0)
    return torch.where(comparable, deviations, 0.0).to(rewards.dtype)
