import math

import pytest
import torch

from fapo_megatron.algo.advantages import grpo_advantages
from fapo_megatron.algo.progress import flawed_positive_share, learning_progress
from fapo_megatron.algo.rewards import fapo_rewards

T, F = True, False


def _batch(groups: dict[int, tuple[int, int, int]]):
    """groups: id -> (clean, flawed, wrong) counts, laid out group after group."""
    correct, flawed, ids = [], [], []
    for group_id, (num_clean, num_flawed, num_wrong) in groups.items():
        correct += [T] * (num_clean + num_flawed) + [F] * num_wrong
        flawed += [F] * num_clean + [T] * num_flawed + [F] * num_wrong
        ids += [group_id] * (num_clean + num_flawed + num_wrong)
    return torch.tensor(correct), torch.tensor(flawed), torch.tensor(ids)


def test_hand_computed_groups():
    # id 7: rho 2 (> 1, suppress); id 1: rho 1/3 (< 1, exploit); id 4: rho 1 (crossing); id 9: no wrong (inf).
    correct, flawed, ids = _batch({7: (4, 2, 2), 1: (1, 1, 3), 4: (2, 2, 2), 9: (3, 1, 0)})
    progress = learning_progress(correct, flawed, ids)
    assert progress["group_ids"].tolist() == [1, 4, 7, 9]
    assert progress["alpha"].tolist() == pytest.approx([1 / 5, 2 / 6, 4 / 8, 3 / 4])
    assert progress["beta"].tolist() == pytest.approx([3 / 5, 2 / 6, 2 / 8, 0.0])
    assert progress["gamma"].tolist() == pytest.approx([1 / 5, 2 / 6, 2 / 8, 1 / 4])
    assert progress["rho"].tolist() == pytest.approx([1 / 3, 1.0, 2.0, math.inf])
    assert progress["flawed_advantage_sign"].tolist() == [1, 0, -1, -1]
    assert progress["mean_rho"] == pytest.approx((1 / 3 + 1.0 + 2.0) / 3)
    assert progress["positive_flawed_advantage_share"] == pytest.approx(1 / 4)


def test_lambda_moves_the_crossing():
    # rho = 2 in every group: lam 1 -> suppress, lam 0.5 (threshold 3) -> exploit, lam 2/3 (threshold 2) -> zero.
    correct, flawed, ids = _batch({0: (2, 1, 1), 1: (4, 3, 2)})
    assert learning_progress(correct, flawed, ids, lam=1.0)["flawed_advantage_sign"].tolist() == [-1, -1]
    assert learning_progress(correct, flawed, ids, lam=0.5)["flawed_advantage_sign"].tolist() == [1, 1]
    assert learning_progress(correct, flawed, ids, lam=2 / 3)["flawed_advantage_sign"].tolist() == [0, 0]


@pytest.mark.parametrize("lam", [1.0, 0.5, 0.25, 1.5])
def test_predicted_sign_matches_actual_advantages(lam):
    generator = torch.Generator().manual_seed(11)
    groups = {}
    for group_id in range(40):
        num_flawed = int(torch.randint(1, 4, (1,), generator=generator))
        num_clean, num_wrong = (int(v) for v in torch.randint(0, 7, (2,), generator=generator))
        groups[group_id] = (num_clean, num_flawed, num_wrong)
    correct, flawed, ids = _batch(groups)
    advantages = grpo_advantages(fapo_rewards(correct, flawed, lam=lam).rewards.double(), ids)
    predicted = learning_progress(correct, flawed, ids, lam=lam)["flawed_advantage_sign"]
    for group_id in groups:
        flawed_advantage = advantages[(ids == group_id) & flawed][0].item()
        actual = 0 if abs(flawed_advantage) < 1e-9 else int(math.copysign(1, flawed_advantage))
        assert predicted[group_id].item() == actual, (groups[group_id], flawed_advantage)


def test_flawed_positive_share():
    correct = torch.tensor([T, T, T, T, F])
    flawed = torch.tensor([T, F, F, T, T])
    available = torch.tensor([T, T, T, F, T])
    assert flawed_positive_share(correct, flawed) == pytest.approx(2 / 4)
    assert flawed_positive_share(correct, flawed, available) == pytest.approx(1 / 3)
    assert math.isnan(flawed_positive_share(torch.tensor([F]), torch.tensor([T])))


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="flawed"):
        learning_progress(torch.tensor([T]), torch.tensor([1]), torch.tensor([0]))
