import math

import pytest
import torch

from fapo_megatron.algo.rewards import VerdictUnavailableError, fapo_rewards, overlong_penalty

T, F = True, False
# Rollouts: wrong, clean positive, flawed positive, positive without verdict, wrong without verdict.
CORRECT = torch.tensor([F, T, T, T, F])
FLAWED = torch.tensor([F, F, T, F, T])
AVAILABLE = torch.tensor([T, T, T, F, F])


def test_outcome_and_flaw_penalty_default_lambda():
    result = fapo_rewards(CORRECT[:3], FLAWED[:3])
    assert result.rewards.tolist() == [-1.0, 1.0, 0.0]
    assert result.outcome.tolist() == [-1.0, 1.0, 1.0]
    assert result.keep.tolist() == [T, T, T]
    assert (result.num_flawed, result.num_unavailable, result.num_dropped) == (1, 0, 0)


def test_flawed_flag_on_a_wrong_rollout_is_ignored():
    result = fapo_rewards(torch.tensor([F]), torch.tensor([T]), lam=0.7)
    assert result.rewards.tolist() == [-1.0]
    assert result.num_flawed == 0


def test_lambda_scales_penalty():
    result = fapo_rewards(CORRECT[:3], FLAWED[:3], lam=0.5)
    assert result.rewards.tolist() == [-1.0, 1.0, 0.5]


def test_unavailable_treat_as_clean():
    result = fapo_rewards(CORRECT, FLAWED, AVAILABLE, unavailable_policy="treat_as_clean")
    assert result.rewards.tolist() == [-1.0, 1.0, 0.0, 1.0, -1.0]
    assert result.num_unavailable == 1  # the wrong rollout was never asked
    assert result.penalized.tolist() == [F, F, T, F, F]


def test_unavailable_treat_as_flawed():
    result = fapo_rewards(CORRECT, FLAWED, AVAILABLE, lam=0.25, unavailable_policy="treat_as_flawed")
    assert result.rewards.tolist() == [-1.0, 1.0, 0.75, 0.75, -1.0]
    assert result.num_flawed == 1 and result.num_unavailable == 1 and result.num_dropped == 0
    assert result.keep.all()


def test_unavailable_drop():
    result = fapo_rewards(CORRECT, FLAWED, AVAILABLE, unavailable_policy="drop")
    assert result.keep.tolist() == [T, T, T, F, T]
    assert result.num_dropped == 1
    assert math.isnan(result.rewards[3].item())
    assert result.rewards[[0, 1, 2, 4]].tolist() == [-1.0, 1.0, 0.0, -1.0]
    assert result.outcome[3].item() == 1.0


def test_unavailable_fail_names_count():
    with pytest.raises(VerdictUnavailableError, match="1 of 3 correct rollouts"):
        fapo_rewards(CORRECT, FLAWED, AVAILABLE, unavailable_policy="fail")
    result = fapo_rewards(CORRECT[:3], FLAWED[:3], AVAILABLE[:3], unavailable_policy="fail")
    assert result.rewards.tolist() == [-1.0, 1.0, 0.0]


def test_bad_inputs_name_the_tensor():
    with pytest.raises(TypeError, match="flawed"):
        fapo_rewards(CORRECT, FLAWED.int())
    with pytest.raises(ValueError, match="available"):
        fapo_rewards(CORRECT, FLAWED, AVAILABLE[:2])
    with pytest.raises(ValueError, match="unavailable_policy"):
        fapo_rewards(CORRECT, FLAWED, unavailable_policy="ignore")
    with pytest.raises(ValueError, match="overlong"):
        fapo_rewards(CORRECT, FLAWED, overlong=torch.zeros(2))


def test_overlong_penalty_boundaries():
    # L_max = 100, B = 20: no penalty up to 80, -factor at 100, linear in between.
    lengths = torch.tensor([0, 79, 80, 85, 90, 100])
    penalty = overlong_penalty(lengths, 100, 20, factor=2.0)
    assert penalty.tolist() == pytest.approx([0.0, 0.0, 0.0, -0.5, -1.0, -2.0])
    assert overlong_penalty(lengths, 100, 0).tolist() == [0.0] * 6
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(lengths, 100, 101)


def test_overlong_added_to_fapo_rewards():
    correct = torch.tensor([T, T, F])
    flawed = torch.tensor([F, T, F])
    lengths = torch.tensor([80, 100, 90])
    result = fapo_rewards(correct, flawed, overlong=overlong_penalty(lengths, 100, 20, factor=1.0))
    assert result.rewards.tolist() == pytest.approx([1.0, -1.0, -1.5])
    assert result.outcome.tolist() == [1.0, 1.0, -1.0]
