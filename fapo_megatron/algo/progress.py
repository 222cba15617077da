"""FAPO's learning-progress view: per group, does a flawed positive currently get a positive advantage?

Terms, per group (prompt) of rollouts: alpha = share of fully correct rollouts (correct and not flawed),
beta = share of wrong rollouts, gamma = share of flawed positives (alpha + beta + gamma = 1), rho = alpha / beta.
With rewards 1 / 1 - lam / -1, a flawed positive's advantage has the sign of 1 - lam - mean(r) =
2 * beta - lam * (alpha + beta): positive while rho < 2/lam - 1 (warm-up, flawed positives exploited), negative
above (refinement, flawed positives suppressed). The reward variance gap to GRPO is
var_FAPO - var_GRPO = lam * gamma * (1 - gamma) * (lam - 4 / (rho + 1)), gamma being the share of the group.
"""

from __future__ import annotations

import math

import torch


def _group_counts(num_groups: int, group_index: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
    counts = torch.zeros(num_groups, dtype=torch.float64, device=flags.device)
    return counts.index_add_(0, group_index, flags.to(torch.float64))


def learning_progress(
    correct: torch.Tensor, flawed: torch.Tensor, group_ids: torch.Tensor, lam: float = 1.0
) -> dict[str, torch.Tensor | float]:
    """Per-group alpha, beta, gamma, rho and the predicted sign of a flawed positive's advantage, plus batch summaries.

    Returns tensors over the G distinct groups (sorted ids in `group_ids`): `alpha`, `beta`, `gamma`, `rho`
    (inf where beta = 0) and `flawed_advantage_sign` (+1, -1, or 0 at rho = 2/lam - 1 or when the group is
    all flawed positives, whose advantages are then 0); and floats `mean_rho` (over groups with finite rho,
    NaN if none) and `positive_flawed_advantage_share` (share of groups whose sign is +1).
    """
    for name, tensor in (("correct", correct), ("flawed", flawed)):
        if tensor.dtype != torch.bool or tensor.shape != group_ids.shape or tensor.dim() != 1:
            raise ValueError(
                f"{name} must be a 1-D bool tensor shaped like group_ids {tuple(group_ids.shape)}, "
                f"got {tensor.dtype} {tuple(tensor.shape)}"
            )
    if lam < 0:
        raise ValueError(f"lam={lam} must be >= 0")
    unique_ids, group_index = torch.unique(group_ids, return_inverse=True)
    num_groups = unique_ids.numel()
    sizes = _group_counts(num_groups, group_index, torch.ones_like(correct))
    num_clean = _group_counts(num_groups, group_index, correct & ~flawed)
    num_wrong = _group_counts(num_groups, group_index, ~correct)
    num_flawed = sizes - num_clean - num_wrong

    alpha, beta, gamma = num_clean / sizes, num_wrong / sizes, num_flawed / sizes
    rho = torch.where(num_wrong > 0, num_clean / num_wrong.clamp(min=1.0), math.inf)
    margin = 2.0 * num_wrong - lam * (num_clean + num_wrong)
    margin = torch.where(margin.abs() <= 1e-9 * (num_clean + num_wrong), 0.0, margin)  # lam's rounding at the crossing
    sign = torch.sign(margin).to(torch.long)
    finite_rho = rho[torch.isfinite(rho)]
    return {
        "group_ids": unique_ids,
        "alpha": alpha,
        "beta": beta,
        "gamma": gamma,
        "rho": rho,
        "flawed_advantage_sign": sign,
        "mean_rho": finite_rho.mean().item() if finite_rho.numel() else math.nan,
        "positive_flawed_advantage_share": (sign > 0).to(torch.float64).mean().item() if num_groups else math.nan,
    }


def flawed_positive_share(correct: torch.Tensor, flawed: torch.Tensor, available: torch.Tensor | None = None) -> float:
    """Share of correct rollouts that are flawed (of those with a verdict when `available` is given); NaN if none."""
    judged = correct if available is None else correct & available
    num_judged = int(judged.sum())
    if num_judged == 0:
        return math.nan
    return int((judged & flawed).sum()) / num_judged
