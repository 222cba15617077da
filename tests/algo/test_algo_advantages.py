import math
import statistics
from fractions import Fraction

import pytest
import torch

from fapo_megatron.algo.advantages import grpo_advantages
from fapo_megatron.algo.rewards import fapo_rewards


def _group(num_clean: int, num_flawed: int, num_wrong: int, group_id: int = 0):
    """One prompt's rollouts: clean positives, then flawed positives, then wrong ones."""
    correct = torch.tensor([True] * (num_clean + num_flawed) + [False] * num_wrong)
    flawed = torch.tensor([False] * num_clean + [True] * num_flawed + [False] * num_wrong)
    group_ids = torch.full((correct.numel(),), group_id, dtype=torch.long)
    return correct, flawed, group_ids


def test_hand_computed_group_uses_unbiased_std():
    rewards = torch.tensor([1.0, 0.0, -1.0, -1.0])
    advantages = grpo_advantages(rewards, torch.zeros(4, dtype=torch.long))
    mean, std = -0.25, statistics.stdev([1.0, 0.0, -1.0, -1.0])
    assert advantages.tolist() == pytest.approx([(r - mean) / (std + 1e-6) for r in [1.0, 0.0, -1.0, -1.0]])


def test_groups_interleaved_with_arbitrary_ids():
    rewards = torch.tensor([1.0, 5.0, -1.0, 7.0, 1.0, 6.0])
    group_ids = torch.tensor([42, -3, 42, -3, 42, -3])
    advantages = grpo_advantages(rewards, group_ids, eps=0.0)
    first, second = [1.0, -1.0, 1.0], [5.0, 7.0, 6.0]
    expected = {}
    for values, positions in ((first, [0, 2, 4]), (second, [1, 3, 5])):
        mean, std = statistics.mean(values), statistics.stdev(values)
        expected.update({p: (v - mean) / std for p, v in zip(positions, values)})
    assert advantages.tolist() == pytest.approx([expected[i] for i in range(6)])


def test_dr_grpo_is_reward_minus_group_mean():
    rewards = torch.tensor([1.0, 0.0, -1.0, 3.0, 1.0])
    advantages = grpo_advantages(rewards, torch.tensor([0, 0, 0, 1, 1]), norm_by_std=False)
    assert advantages.tolist() == pytest.approx([1.0, 0.0, -1.0, 1.0, -1.0])


def test_group_of_one_and_constant_group_get_zero():
    rewards = torch.tensor([1.0, 0.5, 0.5, 0.5])
    advantages = grpo_advantages(rewards, torch.tensor([0, 1, 1, 1]))
    assert advantages.tolist() == [0.0, 0.0, 0.0, 0.0]
    assert grpo_advantages(rewards[:1], torch.tensor([3]), norm_by_std=False).tolist() == [0.0]


def test_masked_rollout_gets_zero_and_leaves_group_statistics():
    rewards = torch.tensor([1.0, -1.0, math.nan, 1.0, 2.0, math.nan])
    group_ids = torch.tensor([0, 0, 0, 0, 1, 1])
    mask = torch.tensor([True, True, False, True, True, False])
    advantages = grpo_advantages(rewards, group_ids, mask=mask)
    mean, std = 1.0 / 3.0, statistics.stdev([1.0, -1.0, 1.0])
    expected = [(1 - mean) / (std + 1e-6), (-1 - mean) / (std + 1e-6), 0.0, (1 - mean) / (std + 1e-6), 0.0, 0.0]
    assert advantages.tolist() == pytest.approx(expected)


def test_nan_reward_at_kept_rollout_is_an_error():
    with pytest.raises(ValueError, match="NaN"):
        grpo_advantages(torch.tensor([1.0, math.nan]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="group_ids"):
        grpo_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]))


def test_dropped_verdicts_flow_from_rewards_to_advantages():
    correct = torch.tensor([True, True, False, True])
    flawed = torch.zeros(4, dtype=torch.bool)
    available = torch.tensor([True, True, True, False])
    result = fapo_rewards(correct, flawed, available, unavailable_policy="drop")
    advantages = grpo_advantages(result.rewards, torch.zeros(4, dtype=torch.long), mask=result.keep)
    std = statistics.stdev([1.0, 1.0, -1.0])
    assert advantages.tolist() == pytest.approx([(2 / 3) / (std + 1e-6)] * 2 + [(-4 / 3) / (std + 1e-6), 0.0])


# (lam, rho = num_clean / num_wrong at the predicted crossing 2 / lam - 1)
CROSSINGS = [(1.0, Fraction(1)), (0.5, Fraction(3)), (0.4, Fraction(4)), (0.25, Fraction(7)), (1.5, Fraction(1, 3))]


@pytest.mark.parametrize("lam,rho_star", CROSSINGS)
@pytest.mark.parametrize("scale,num_flawed", [(1, 1), (2, 3), (3, 2)])
def test_flawed_positive_advantage_crosses_zero_at_rho_star(lam, rho_star, scale, num_flawed):
    """A flawed positive's advantage is > 0 for rho < 2/lam - 1, 0 at it, < 0 above (FAPO learning-progress view)."""
    base_clean, base_wrong = rho_star.numerator * scale, rho_star.denominator * scale
    cases = [(base_clean, base_wrong, 0), (base_clean + 1, base_wrong, -1), (base_clean, base_wrong + 1, 1)]
    if base_clean > 1:
        cases.append((base_clean - 1, base_wrong, 1))
    for group_id, (num_clean, num_wrong, expected_sign) in enumerate(cases):
        correct, flawed, group_ids = _group(num_clean, num_flawed, num_wrong, group_id)
        result = fapo_rewards(correct, flawed, lam=lam)
        advantages = grpo_advantages(result.rewards, group_ids)
        flawed_advantage = advantages[num_clean].item()
        assert torch.allclose(advantages[num_clean : num_clean + num_flawed], advantages[num_clean])
        if expected_sign == 0:
            assert abs(flawed_advantage) < 1e-5, (num_clean, num_flawed, num_wrong, flawed_advantage)
        else:
            assert math.copysign(1.0, flawed_advantage) == expected_sign and abs(flawed_advantage) > 1e-3


def _variance_gap_closed_form(num_clean: int, num_flawed: int, num_wrong: int, lam: float) -> float:
    """lam * gamma * (1 - gamma) * (lam - 4 / (rho + 1)) with gamma = flawed share of the whole group.

    On paper: rewards 1 (share alpha), 1 - lam (share gamma), -1 (share beta), alpha + gamma + beta = 1.
    var_FAPO - var_GRPO = lam^2 gamma (1 - gamma) - 4 lam gamma beta, and beta = (1 - gamma) / (rho + 1).
    """
    size = num_clean + num_flawed + num_wrong
    gamma = num_flawed / size
    rho = num_clean / num_wrong
    return lam * gamma * (1 - gamma) * (lam - 4 / (rho + 1))


@pytest.mark.parametrize("lam", [1.0, 0.5, 0.3, 2.0])
@pytest.mark.parametrize("counts", [(2, 1, 1), (1, 3, 4), (5, 2, 1), (3, 3, 2), (6, 1, 1), (1, 1, 6)])
def test_reward_variance_gap_matches_closed_form(lam, counts):
    """Population variance of FAPO vs GRPO rewards, read from the Dr.GRPO advantages (r - mean)."""
    correct, flawed, group_ids = _group(*counts)
    fapo = fapo_rewards(correct, flawed, lam=lam).rewards.double()
    grpo = fapo_rewards(correct, torch.zeros_like(flawed)).rewards.double()
    var_fapo = grpo_advantages(fapo, group_ids, norm_by_std=False).square().mean().item()
    var_grpo = grpo_advantages(grpo, group_ids, norm_by_std=False).square().mean().item()
    assert var_fapo - var_grpo == pytest.approx(_variance_gap_closed_form(*counts, lam), abs=1e-6)  # float32 rewards
    # Normalised advantages have sample variance 1 (up to eps) whenever the group is not constant.
    normalised = grpo_advantages(fapo, group_ids, eps=0.0)
    assert normalised.square().sum().item() == pytest.approx(len(fapo) - 1)


def test_gamma_among_positives_is_not_the_closed_form_share():
    """Guards the derivation: with gamma read as the flawed share among positives the identity fails."""
    num_clean, num_flawed, num_wrong = 2, 1, 1
    correct, flawed, group_ids = _group(num_clean, num_flawed, num_wrong)
    fapo = fapo_rewards(correct, flawed).rewards.double()
    grpo = fapo_rewards(correct, torch.zeros_like(flawed)).rewards.double()
    gap = fapo.var(unbiased=False).item() - grpo.var(unbiased=False).item()
    assert gap == pytest.approx(-1 / 16)
    assert _variance_gap_closed_form(num_clean, num_flawed, num_wrong, 1.0) == pytest.approx(-1 / 16)
    gamma_pos, rho = num_flawed / (num_clean + num_flawed), num_clean / num_wrong
    assert gamma_pos * (1 - gamma_pos) * (1 - 4 / (rho + 1)) != pytest.approx(gap)


def test_variance_gap_sign_flips_at_four_over_lambda_minus_one():
    """FAPO reward std exceeds GRPO's exactly when rho > 4/lam - 1 (= 3 for lam = 1)."""
    for num_clean, sign in ((2, -1), (3, 0), (4, 1)):
        correct, flawed, _ = _group(num_clean, 2, 1)
        fapo = fapo_rewards(correct, flawed).rewards.double()
        grpo = fapo_rewards(correct, torch.zeros_like(flawed)).rewards.double()
        gap = fapo.var(unbiased=False).item() - grpo.var(unbiased=False).item()
        assert (gap > 1e-12) - (gap < -1e-12) == sign
