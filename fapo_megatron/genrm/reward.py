"""The GenRM's own RL reward (FAPO-GenRM training): how close the predicted earliest-error index is to the label.

Legend: B = judged samples. pred = predicted index t^, gt = labelled index t*, n = number of steps.

    pred unparseable or out of range (not -1 and not in 0..n-1)  -> -1
    gt = -1                                                       -> +1 if pred = -1 else -1
    gt != -1 and pred = -1                                        -> -1
    gt != -1 and pred != -1                                       -> 1 - |pred - gt| / n
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fapo_megatron.genrm.types import Verdict

INVALID_PREDICTION = -2
"""Stands for an unparseable answer in `pred` (any value that is not -1 and not in 0..n-1 counts the same)."""


def genrm_step_reward(
    pred_B: torch.Tensor | Sequence[int], gt_B: torch.Tensor | Sequence[int], num_steps_B: torch.Tensor | Sequence[int]
) -> torch.Tensor:
    """Float32 [B] reward of predictions `pred_B` against labels `gt_B` for solutions of `num_steps_B` steps."""
    pred_B, gt_B, num_steps_B = (torch.as_tensor(x, dtype=torch.long) for x in (pred_B, gt_B, num_steps_B))
    if not pred_B.shape == gt_B.shape == num_steps_B.shape or pred_B.dim() != 1:
        raise ValueError(
            f"pred, gt and num_steps must be 1-D of one length, got {tuple(pred_B.shape)}, {tuple(gt_B.shape)}, "
            f"{tuple(num_steps_B.shape)}"
        )
    if bool((num_steps_B < 0).any()):
        raise ValueError("num_steps has negative entries")
    gt_valid_B = (gt_B == -1) | ((gt_B >= 0) & (gt_B < num_steps_B))
    if not bool(gt_valid_B.all()):
        bad = int((~gt_valid_B).nonzero()[0])
        raise ValueError(f"label gt[{bad}]={int(gt_B[bad])} outside -1..{int(num_steps_B[bad]) - 1}")
    pred_none_B = pred_B == -1
    pred_step_B = (pred_B >= 0) & (pred_B < num_steps_B)
    gt_none_B = gt_B == -1
    distance_B = (pred_B - gt_B).abs().to(torch.float32) / num_steps_B.clamp(min=1).to(torch.float32)
    reward_B = torch.full(pred_B.shape, -1.0, dtype=torch.float32)
    reward_B = torch.where(gt_none_B & pred_none_B, 1.0, reward_B)
    return torch.where(~gt_none_B & pred_step_B, 1.0 - distance_B, reward_B)


def genrm_step_reward_from_verdicts(verdicts: Sequence[Verdict], gt: Sequence[int]) -> torch.Tensor:
    """The same reward for parsed verdicts (a verdict that is not ok counts as unparseable)."""
    if len(verdicts) != len(gt):
        raise ValueError(f"{len(verdicts)} verdicts but {len(gt)} labels")
    pred = [INVALID_PREDICTION if v.first_error_step is None else v.first_error_step for v in verdicts]
    return genrm_step_reward(pred, gt, [v.num_steps for v in verdicts])
