"""GenRM step-distance reward against hand-computed values."""

import pytest
import torch

from fapo_megatron.genrm.reward import INVALID_PREDICTION, genrm_step_reward, genrm_step_reward_from_verdicts
from fapo_megatron.genrm.verdict import parse_verdict


def test_hand_computed_table():
    rows = [  # pred, gt, n, expected
        (-1, -1, 5, 1.0),
        (2, -1, 5, -1.0),
        (-1, 3, 5, -1.0),
        (3, 3, 5, 1.0),
        (1, 3, 5, 1.0 - 2 / 5),
        (4, 0, 5, 1.0 - 4 / 5),
        (0, 7, 8, 1.0 - 7 / 8),
        (INVALID_PREDICTION, -1, 5, -1.0),
        (INVALID_PREDICTION, 2, 5, -1.0),
        (5, 2, 5, -1.0),  # out of range (valid 0..4)
        (-3, 2, 5, -1.0),
        (-1, -1, 0, 1.0),
        (0, 0, 1, 1.0),
    ]
    pred, gt, num_steps, expected = zip(*rows)
    reward = genrm_step_reward(list(pred), list(gt), list(num_steps))
    assert reward.dtype == torch.float32
    torch.testing.assert_close(reward, torch.tensor(expected, dtype=torch.float32))


def test_matches_scalar_definition_on_random_batch():
    generator = torch.Generator().manual_seed(0)
    num_steps = torch.randint(1, 12, (500,), generator=generator)
    gt = torch.where(
        torch.rand(500, generator=generator) < 0.3, -1, (torch.rand(500, generator=generator) * num_steps).long()
    )
    pred = torch.randint(-3, 14, (500,), generator=generator)

    def scalar(p, g, n):
        if p != -1 and not 0 <= p < n:
            return -1.0
        if g == -1:
            return 1.0 if p == -1 else -1.0
        if p == -1:
            return -1.0
        return 1.0 - abs(p - g) / n

    expected = torch.tensor([scalar(int(p), int(g), int(n)) for p, g, n in zip(pred, gt, num_steps)])
    torch.testing.assert_close(genrm_step_reward(pred, gt, num_steps), expected)


def test_from_verdicts():
    verdicts = [parse_verdict("\\boxed{1}", 4), parse_verdict("\\boxed{9}", 4), parse_verdict("\\boxed{-1}", 2)]
    torch.testing.assert_close(genrm_step_reward_from_verdicts(verdicts, [3, 3, -1]), torch.tensor([0.5, -1.0, 1.0]))


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="one length"):
        genrm_step_reward([1, 2], [1], [3, 3])
    with pytest.raises(ValueError, match=r"gt\[1\]=3 outside -1..2"):
        genrm_step_reward([0, 0], [0, 3], [3, 3])
    with pytest.raises(ValueError, match="2 verdicts but 1 labels"):
        genrm_step_reward_from_verdicts([parse_verdict("", 1)] * 2, [0])
