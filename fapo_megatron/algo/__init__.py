"""FAPO algorithm core in plain torch: rewards, group advantages, the PPO-clip loss and learning-progress stats.

Nothing here imports Megatron, SGLang or Ray; every function takes tensors and numbers.
"""

from fapo_megatron.algo.advantages import grpo_advantages
from fapo_megatron.algo.losses import LOSS_AGG_MODES, aggregate_loss, kl_penalty, ppo_loss
from fapo_megatron.algo.progress import flawed_positive_share, learning_progress
from fapo_megatron.algo.rewards import (
    UNAVAILABLE_POLICIES,
    RewardResult,
    VerdictUnavailableError,
    fapo_rewards,
    overlong_penalty,
)

__all__ = [
    "LOSS_AGG_MODES",
    "UNAVAILABLE_POLICIES",
    "RewardResult",
    "VerdictUnavailableError",
    "aggregate_loss",
    "fapo_rewards",
    "flawed_positive_share",
    "grpo_advantages",
    "kl_penalty",
    "learning_progress",
    "overlong_penalty",
    "ppo_loss",
]
