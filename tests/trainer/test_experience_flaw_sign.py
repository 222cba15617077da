"""The step's share of flawed positives with a positive advantage, against FAPO's closed form sign(beta - alpha)."""

import dataclasses
import math

import pytest
import torch

from fapo_megatron.config import AlgorithmConfig, GenRMConfig, OverlongConfig, RolloutConfig
from fapo_megatron.data import arith_solution, make_arith_items
from fapo_megatron.engine_protocol import Generation
from fapo_megatron.experience import grade_rollouts
from fapo_megatron.genrm.program_judge import ProgramJudge

# Group 0: 1 clean, 1 flawed, 3 wrong (rho = 1/3: a flawed positive still gains); group 1: 3 clean, 1 flawed,
# 1 wrong (rho = 3: it loses). With lam = 1 the sign is that of beta - alpha; GRPO rewards it like a clean one.
GROUPS = (
    (None, "skipped_trivial", "wrong_answer", "wrong_answer", "wrong_answer"),
    (None, None, None, "bare_trivial", "wrong_answer"),
)


def _grade(name: str, groups=GROUPS):
    items = make_arith_items(len(groups), seed=2, max_value=20, max_operand=5, identity_steps=1)
    generations, correct = [], []
    for index, flaws in enumerate(groups):
        for flaw in flaws:
            text = arith_solution(items[index], flaw=flaw)
            generations.append(
                Generation(prompt_index=index, token_ids=[5] * 8, text=text, logprobs=[0.0] * 8, finish_reason="stop")
            )
            correct.append(flaw != "wrong_answer")
    algorithm = AlgorithmConfig(name=name, overlong=OverlongConfig(enable=False))
    if name == "grpo":  # as the trainer does: GRPO is FAPO with the flaw penalty off, verdicts still taken
        algorithm = dataclasses.replace(algorithm, lam=0.0)
    graded = grade_rollouts(
        items,
        generations,
        torch.tensor(correct),
        ProgramJudge(),
        algorithm=algorithm,
        rollout=RolloutConfig(max_response_tokens=64),
        genrm=GenRMConfig(backend="program"),
    )
    return graded


def test_fapo_flawed_positive_advantage_sign_follows_rho():
    graded = _grade("fapo")
    assert graded.flawed.tolist() == [f in ("skipped_trivial", "bare_trivial") for group in GROUPS for f in group]
    assert graded.advantages[1] > 0 > graded.advantages[8]
    assert graded.metrics["progress/flawed_positive_advantage_share"] == pytest.approx(0.5)
    assert _grade("fapo", GROUPS[1:]).metrics["progress/flawed_positive_advantage_share"] == 0.0


def test_grpo_flawed_positives_gain_like_clean_ones_and_no_flawed_positive_no_share():
    assert _grade("grpo").metrics["progress/flawed_positive_advantage_share"] == 1.0
    clean_only = ((None, "wrong_answer"),)
    assert math.isnan(_grade("fapo", clean_only).metrics["progress/flawed_positive_advantage_share"])
