"""From a step's generations to the actor's TrainBatch: answer check, GenRM on correct answers, FAPO rewards,
group advantages, and the token layout the actor expects.

Legend: N = rollouts of the step (prompt-major: the n samples of prompt i are rows i*n .. i*n+n-1),
S = padded prompt + response length.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from fapo_megatron.algo import (
    fapo_rewards,
    flawed_positive_share,
    grpo_advantages,
    learning_progress,
    overlong_penalty,
)
from fapo_megatron.algo.batch import TrainBatch
from fapo_megatron.algo.rewards import VerdictUnavailableError
from fapo_megatron.config import AlgorithmConfig, GenRMConfig, RolloutConfig
from fapo_megatron.data.items import PromptItem
from fapo_megatron.engine_protocol import Generation
from fapo_megatron.genrm.types import Judge, JudgeCounts, JudgeRequest, Verdict, verdict_tensors


@dataclass
class GradedRollouts:
    """What the reward pipeline decided for each rollout of a step."""

    correct: torch.Tensor
    """[N] bool: the final answer matches the ground truth."""
    flawed: torch.Tensor
    """[N] bool: correct, and the GenRM found a wrong step (False where not asked or unavailable)."""
    available: torch.Tensor
    """[N] bool: a verdict exists (True where the GenRM was not needed)."""
    rewards: torch.Tensor
    """[N] float: FAPO (or GRPO) reward with overlong shaping; NaN for dropped rollouts."""
    keep: torch.Tensor
    """[N] bool: the rollout enters the update (False: dropped by the unavailable-verdict policy)."""
    advantages: torch.Tensor
    """[N] float: group-normalised advantages (0 where not kept)."""
    group_ids: torch.Tensor
    """[N] long: the prompt each rollout answers."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Reward-side metrics of the step."""


def judge_request(item: PromptItem, generation: Generation) -> JudgeRequest:
    """What the GenRM is asked about one rollout."""
    return JudgeRequest(problem=item.prompt, solution=generation.text, ground_truth=item.ground_truth)


def judge_correct_rollouts(
    judge: Judge | None,
    items: Sequence[PromptItem],
    generations: Sequence[Generation],
    correct: torch.Tensor,
    verdicts: Mapping[int, Verdict] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, JudgeCounts]:
    """Ask the GenRM about the rollouts with a correct answer only; returns (flawed, available, counts).

    `verdicts` ({rollout index: verdict}, streamed while the rollout ran) replaces the call; it must hold exactly
    the correct rollouts, so none is judged twice or left out.
    """
    num = len(generations)
    flawed = torch.zeros(num, dtype=torch.bool)
    available = torch.ones(num, dtype=torch.bool)
    asked = [i for i in range(num) if bool(correct[i])]
    if verdicts is not None:
        if set(verdicts) != set(asked):
            extra, missing = sorted(set(verdicts) - set(asked)), sorted(set(asked) - set(verdicts))
            raise RuntimeError(
                f"streamed verdicts for rollouts {extra} that are not correct, none for correct rollouts {missing}"
            )
        ordered = [verdicts[i] for i in asked]
    elif judge is None or not asked:
        return flawed, available, JudgeCounts()
    else:
        ordered = judge.judge([judge_request(items[generations[i].prompt_index], generations[i]) for i in asked])
        if len(ordered) != len(asked):
            raise RuntimeError(f"the GenRM returned {len(ordered)} verdicts for {len(asked)} requests")
    if not asked:
        return flawed, available, JudgeCounts()
    asked_flawed, asked_available = verdict_tensors(ordered)
    index = torch.tensor(asked, dtype=torch.long)
    flawed[index] = asked_flawed
    available[index] = asked_available
    return flawed, available, JudgeCounts.from_verdicts(ordered)


def check_genrm_outage(counts: JudgeCounts, max_unavailable_fraction: float) -> None:
    """Stop the step when more of its GenRM verdicts are missing than allowed: training on what is left (under
    `drop`, the wrong answers only) would learn from a GenRM that is down."""
    missing = counts.asked - counts.flawed - counts.clean
    if counts.asked and missing / counts.asked > max_unavailable_fraction:
        raise VerdictUnavailableError(
            f"GenRM outage: {missing} of {counts.asked} verdicts missing ({counts.errors} errors, "
            f"{counts.timed_out} timed out, {counts.unparseable} unparseable, {counts.unavailable} unavailable), "
            f"above genrm.max_unavailable_fraction={max_unavailable_fraction:g}; check the GenRM (genrm.url, its "
            "workers) or raise genrm.max_unavailable_fraction"
        )


def grade_rollouts(
    items: Sequence[PromptItem],
    generations: Sequence[Generation],
    correct: torch.Tensor,
    judge: Judge | None,
    *,
    algorithm: AlgorithmConfig,
    rollout: RolloutConfig,
    genrm: GenRMConfig,
    verdicts: Mapping[int, Verdict] | None = None,
) -> GradedRollouts:
    """The reward side of one FAPO step (no GenRM when `judge` is None: plain GRPO); `verdicts`: the correct
    rollouts' verdicts, streamed while they were generated (see `judge_correct_rollouts`)."""
    if algorithm.reward == "genrm_step":
        return grade_genrm_rollouts(items, generations, algorithm=algorithm, rollout=rollout)
    flawed, available, counts = judge_correct_rollouts(judge, items, generations, correct, verdicts)
    check_genrm_outage(counts, genrm.max_unavailable_fraction)
    group_ids = torch.tensor([g.prompt_index for g in generations], dtype=torch.long)
    lengths = torch.tensor([len(g.token_ids) for g in generations], dtype=torch.long)
    shaping = overlong_shaping(lengths, algorithm, rollout)
    lam = flaw_penalty(algorithm, judge)
    result = fapo_rewards(
        correct, flawed, available, lam=lam, unavailable_policy=genrm.unavailable_policy, overlong=shaping
    )
    advantages = grpo_advantages(result.rewards, group_ids, norm_by_std=algorithm.norm_adv_by_std, mask=result.keep)
    progress = learning_progress(correct, flawed, group_ids, lam=lam)
    metrics = {
        "reward/mean": float(result.rewards[result.keep].mean()) if bool(result.keep.any()) else math.nan,
        "reward/outcome_mean": float(result.outcome.float().mean()),
        "reward/overlong_mean": float(shaping.mean()),
        "reward/accuracy": float(correct.float().mean()),
        "reward/flawed_positive_share": flawed_positive_share(correct, flawed, available),
        "reward/num_dropped": float(result.num_dropped),
        "reward/num_unavailable": float(result.num_unavailable),
        "reward/advantage_abs_mean": (
            float(advantages[result.keep].abs().mean()) if bool(result.keep.any()) else math.nan
        ),
        "progress/mean_rho": progress["mean_rho"],
        "progress/positive_flawed_advantage_share": progress["positive_flawed_advantage_share"],
        "response/length_mean": float(lengths.float().mean()),
        "response/length_max": float(lengths.max()),
        "response/clip_ratio": sum(g.finish_reason == "length" for g in generations) / max(len(generations), 1),
    }
    # The step's realised sign of the flaw signal (GRPO: +1 whenever rewarded); NaN without flawed positives.
    flawed_positives = correct & flawed & result.keep
    metrics["progress/flawed_positive_advantage_share"] = (
        float((advantages[flawed_positives] > 0).float().mean()) if bool(flawed_positives.any()) else math.nan
    )
    if judge is not None:
        metrics.update(counts.as_metrics())
    return GradedRollouts(
        correct=correct,
        flawed=flawed,
        available=available,
        rewards=result.rewards,
        keep=result.keep,
        advantages=advantages,
        group_ids=group_ids,
        metrics=metrics,
    )


def grade_genrm_rollouts(
    items: Sequence[PromptItem],
    generations: Sequence[Generation],
    *,
    algorithm: AlgorithmConfig,
    rollout: RolloutConfig,
) -> GradedRollouts:
    """GenRM training: the rollouts are GenRM answers, rewarded by step distance to the label (+ overlong shaping)."""
    from fapo_megatron.genrm.task import score_genrm_responses

    scores = score_genrm_responses([items[g.prompt_index] for g in generations], [g.text for g in generations])
    num, group_ids = len(generations), torch.tensor([g.prompt_index for g in generations], dtype=torch.long)
    lengths = torch.tensor([len(g.token_ids) for g in generations], dtype=torch.long)
    shaping = overlong_shaping(lengths, algorithm, rollout)
    rewards, keep = scores.rewards + shaping, torch.ones(num, dtype=torch.bool)
    advantages = grpo_advantages(rewards, group_ids, norm_by_std=algorithm.norm_adv_by_std, mask=keep)
    metrics = {
        "reward/mean": float(rewards.mean()),
        "reward/step_distance_mean": float(scores.rewards.mean()),
        "reward/overlong_mean": float(shaping.mean()),
        "reward/accuracy": float(scores.exact.float().mean()),
        "reward/flawed_positive_share": float("nan"),  # no flaw detector judges a GenRM's own answers
        "reward/advantage_abs_mean": float(advantages.abs().mean()),
        "response/length_mean": float(lengths.float().mean()),
        "response/length_max": float(lengths.max()),
        "response/clip_ratio": sum(g.finish_reason == "length" for g in generations) / num,
        **scores.metrics,
    }
    return GradedRollouts(
        correct=scores.exact,
        flawed=torch.zeros(num, dtype=torch.bool),
        available=keep,
        rewards=rewards,
        keep=keep,
        advantages=advantages,
        group_ids=group_ids,
        metrics=metrics,
    )


def flaw_penalty(algorithm: AlgorithmConfig, judge: Judge | None) -> float:
    """The lam the reward (and the learning-progress metric) uses: GRPO, the baseline, and a run without a judge
    have no flaw penalty; verdicts, when a judge runs, are still logged."""
    return algorithm.lam if algorithm.name == "fapo" and judge is not None else 0.0


def overlong_shaping(lengths: torch.Tensor, algorithm: AlgorithmConfig, rollout: RolloutConfig) -> torch.Tensor:
    """[N] DAPO overlong reward term of each rollout (zeros when shaping is off)."""
    overlong = algorithm.overlong
    if not (overlong.enable and overlong.buffer > 0):
        return torch.zeros(len(lengths))
    return overlong_penalty(lengths, rollout.max_response_tokens, overlong.buffer, overlong.penalty_factor)


def build_train_batch(
    generations: Sequence[Generation], advantages: torch.Tensor, keep: torch.Tensor, pad_id: int
) -> TrainBatch:
    """Kept rollouts as right-padded prompt+response rows; response tokens masked in, with their engine log-probs."""
    rows = [i for i in range(len(generations)) if bool(keep[i])]
    if not rows:
        raise ValueError("every rollout of the step was dropped; nothing to train on")
    sequences = [generations[i].prompt_token_ids + generations[i].token_ids for i in rows]
    width = max(len(s) for s in sequences)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    response_mask = torch.zeros(len(rows), width)
    rollout_logprobs = torch.zeros(len(rows), width)
    for row, (i, seq) in enumerate(zip(rows, sequences)):
        gen = generations[i]
        start = len(gen.prompt_token_ids)
        if start == 0:
            raise ValueError(f"rollout {i} has no prompt tokens; the engine must report prompt_token_ids")
        tokens[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        response_mask[row, start : len(seq)] = 1.0
        rollout_logprobs[row, start : len(seq)] = torch.tensor(gen.logprobs, dtype=torch.float32)
    index = torch.tensor(rows, dtype=torch.long)
    return TrainBatch(
        tokens=tokens,
        lengths=torch.tensor([len(s) for s in sequences], dtype=torch.long),
        response_mask=response_mask,
        advantages=advantages[index].float(),
        group_ids=torch.tensor([generations[i].prompt_index for i in rows], dtype=torch.long),
        rollout_logprobs=rollout_logprobs,
    )
