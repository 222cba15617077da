import math

import pytest
import torch

from fapo_megatron.algo.losses import aggregate_loss, kl_penalty, ppo_loss


def _leaf(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


def _logs(ratios) -> list:
    return [[math.log(r) for r in row] for row in ratios]


# One token per sequence, old log-prob 0 so ratio = exp(logprob). Each row is one clip branch with
# clip_low 0.2, clip_high 0.28, dual_clip_c 10:
# (advantage, ratio, hand loss, hand d loss / d logprob, clip binds, dual-clip binds)
BRANCHES = [
    (1.0, 1.1, -1.1, -1.1, False, False),  # unclipped, A > 0
    (2.0, 1.5, -2.0 * 1.28, 0.0, True, False),  # upper clip, A > 0
    (-1.0, 0.5, 0.8, 0.0, True, False),  # lower clip, A < 0
    (-1.0, 1.5, 1.5, 1.5, False, False),  # A < 0 above 1 + clip_high: never clipped, dual-clip not reached
    (-1.0, 20.0, 10.0, 0.0, False, True),  # dual-clip binds: loss capped at -A * c
    (0.5, 20.0, -0.5 * 1.28, 0.0, True, False),  # huge ratio with A > 0: upper clip, dual-clip never applies
    (0.5, 0.5, -0.25, -0.25, False, False),  # A > 0 below 1 - clip_low: never clipped
]


def test_each_clip_branch_value_gradient_and_metrics():
    advantages = torch.tensor([b[0] for b in BRANCHES], dtype=torch.float64)
    logprobs = _leaf(_logs([[b[1]] for b in BRANCHES]))
    old = torch.zeros_like(logprobs)
    mask = torch.ones_like(logprobs)
    loss, metrics = ppo_loss(logprobs, old, advantages, mask)
    loss.backward()
    count = len(BRANCHES)
    assert loss.item() == pytest.approx(sum(b[2] for b in BRANCHES) / count)
    assert logprobs.grad[:, 0].tolist() == pytest.approx([b[3] / count for b in BRANCHES])
    assert metrics["pg_clipfrac"].item() == pytest.approx(sum(b[4] for b in BRANCHES) / count)
    assert metrics["pg_clipfrac_lower"].item() == pytest.approx(1 / count)
    assert metrics["ppo_kl"].item() == pytest.approx(-sum(math.log(b[1]) for b in BRANCHES) / count)
    assert metrics["local_num_tokens"].item() == count and metrics["local_num_sequences"].item() == count


def test_dual_clip_disabled_leaves_large_ratio_unbounded():
    logprobs = _leaf([[math.log(20.0)]])
    loss, metrics = ppo_loss(logprobs, torch.zeros(1, 1), torch.tensor([-1.0]), torch.ones(1, 1), dual_clip_c=0.0)
    loss.backward()
    assert loss.item() == pytest.approx(20.0)
    assert logprobs.grad.item() == pytest.approx(20.0)
    assert metrics["pg_clipfrac_lower"].item() == 0.0


# Ratio 1 everywhere, so the per-token loss is -A and d loss / d logprob = -A * (aggregation weight).
AGG_ADVANTAGES = [[1.0, 2.0, 99.0], [3.0, 99.0, 99.0], [99.0, 99.0, 99.0]]
AGG_MASK = [[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
AGG_CASES = {
    # mode: (hand loss, hand per-token weights)
    "token-mean": (-(1 + 2 + 3) / 3, [[1 / 3, 1 / 3, 0], [1 / 3, 0, 0], [0, 0, 0]]),
    "seq-mean-token-sum": (-((1 + 2) + 3) / 2, [[1 / 2, 1 / 2, 0], [1 / 2, 0, 0], [0, 0, 0]]),
    "seq-mean-token-mean": (-((1 + 2) / 2 + 3) / 2, [[1 / 4, 1 / 4, 0], [1 / 2, 0, 0], [0, 0, 0]]),
}


@pytest.mark.parametrize("mode", list(AGG_CASES))
def test_aggregation_modes(mode):
    expected_loss, weights = AGG_CASES[mode]
    logprobs = _leaf([[0.0] * 3] * 3)
    advantages = torch.tensor(AGG_ADVANTAGES, dtype=torch.float64)
    loss, _ = ppo_loss(logprobs, torch.zeros(3, 3), advantages, torch.tensor(AGG_MASK), loss_agg_mode=mode)
    loss.backward()
    assert loss.item() == pytest.approx(expected_loss)
    expected_grad = [[-a * w for a, w in zip(arow, wrow)] for arow, wrow in zip(AGG_ADVANTAGES, weights)]
    assert logprobs.grad.tolist() == [pytest.approx(row) for row in expected_grad]


def _random_batch(seed: int, batch: int = 6, length: int = 7):
    generator = torch.Generator().manual_seed(seed)
    old = -torch.rand(batch, length, generator=generator, dtype=torch.float64) * 3
    logprobs = (old + torch.randn(batch, length, generator=generator, dtype=torch.float64) * 0.4).requires_grad_()
    lengths = torch.randint(1, length + 1, (batch,), generator=generator)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).to(torch.float64)
    advantages = torch.randn(batch, generator=generator, dtype=torch.float64) * 2
    extras = {
        "rollout_logprobs": old + torch.randn(batch, length, generator=generator, dtype=torch.float64) * 0.3,
        "ref_logprobs": old + torch.randn(batch, length, generator=generator, dtype=torch.float64) * 0.3,
        "entropy": torch.rand(batch, length, generator=generator, dtype=torch.float64).requires_grad_(),
    }
    return logprobs, old, advantages, mask, extras


@pytest.mark.parametrize("mode", list(AGG_CASES))
def test_micro_batches_with_global_counts_sum_to_full_batch_loss(mode):
    logprobs, old, advantages, mask, extras = _random_batch(seed=3)
    options = dict(loss_agg_mode=mode, tis_cap=2.0, kl_coef=0.1, entropy_coef=0.01, dual_clip_c=3.0, **extras)
    full, _ = ppo_loss(logprobs, old, advantages, mask, **options)
    full_grad = torch.autograd.grad(full, [logprobs, extras["entropy"]])

    num_tokens, num_sequences = mask.sum(), (mask.sum(-1) > 0).sum()
    total = 0.0
    for rows in (slice(0, 1), slice(1, 4), slice(4, 6)):
        part = {key: value[rows] for key, value in extras.items()}
        micro_options = dict(options, **part, num_tokens=num_tokens, num_sequences=num_sequences)
        loss, _ = ppo_loss(logprobs[rows], old[rows], advantages[rows], mask[rows], **micro_options)
        total = total + loss
    split_grad = torch.autograd.grad(total, [logprobs, extras["entropy"]])
    assert total.item() == pytest.approx(full.item(), rel=1e-12)
    for got, want in zip(split_grad, full_grad):
        torch.testing.assert_close(got, want)


def test_micro_batch_metrics_recombine_by_token_weight():
    logprobs, old, advantages, mask, _ = _random_batch(seed=5)
    logprobs = (old + (logprobs - old) * 3).detach()  # push ratios into the clipped ranges
    _, full = ppo_loss(logprobs, old, advantages, mask, dual_clip_c=2.0)
    rows = (slice(0, 2), slice(2, 6))
    parts = [ppo_loss(logprobs[r], old[r], advantages[r], mask[r], dual_clip_c=2.0)[1] for r in rows]
    for key in ("pg_clipfrac", "pg_clipfrac_lower", "ppo_kl"):
        combined = sum(p[key] * p["local_num_tokens"] for p in parts) / sum(p["local_num_tokens"] for p in parts)
        assert combined.item() == pytest.approx(full[key].item())
    assert full["pg_clipfrac"].item() > 0 and full["pg_clipfrac_lower"].item() > 0


def test_truncated_importance_sampling_weights_are_capped_constants():
    # old log-prob 0; rollout log-probs give exp(old - rollout) = 0.5 and 3.0; cap 2.0 -> weights 0.5 and 2.0.
    logprobs = _leaf([[0.0, 0.0]])
    rollout = torch.tensor([[math.log(2.0), -math.log(3.0)]], dtype=torch.float64)
    advantages = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    loss, metrics = ppo_loss(
        logprobs, torch.zeros(1, 2), advantages, torch.ones(1, 2), rollout_logprobs=rollout, tis_cap=2.0
    )
    loss.backward()
    assert loss.item() == pytest.approx((0.5 * -1.0 + 2.0 * 2.0) / 2)
    assert logprobs.grad.tolist() == [pytest.approx([0.5 * -1.0 / 2, 2.0 * 2.0 / 2])]
    assert metrics["tis_ratio_mean"].item() == pytest.approx(1.75)
    assert metrics["tis_ratio_max"].item() == pytest.approx(3.0)
    assert metrics["tis_capped_frac"].item() == pytest.approx(0.5)
    assert metrics["rollout_logprob_abs_diff"].item() == pytest.approx((math.log(2.0) + math.log(3.0)) / 2)
    with pytest.raises(ValueError, match="rollout_logprobs"):
        ppo_loss(logprobs, torch.zeros(1, 2), advantages, torch.ones(1, 2), tis_cap=2.0)


def test_kl_estimators_by_hand():
    logprobs = torch.tensor([[0.0, math.log(2.0)]], dtype=torch.float64)
    ref = torch.tensor([[math.log(2.0), 0.0]], dtype=torch.float64)
    assert kl_penalty(logprobs, ref, "k1").tolist() == [pytest.approx([-math.log(2.0), math.log(2.0)])]
    # k3 = exp(ref - logp) - (ref - logp) - 1
    assert kl_penalty(logprobs, ref, "k3").tolist() == [
        pytest.approx([2.0 - math.log(2.0) - 1.0, 0.5 + math.log(2.0) - 1.0])
    ]


@pytest.mark.parametrize("kl_type,value,grad", [("k1", -math.log(2.0), 1.0), ("k3", 1.0 - math.log(2.0), -1.0)])
def test_kl_term_value_and_gradient(kl_type, value, grad):
    # Zero advantages: the loss is kl_coef * KL alone. logp = 0, ref = log 2 on both tokens.
    logprobs = _leaf([[0.0, 0.0]])
    ref = torch.full((1, 2), math.log(2.0), dtype=torch.float64)
    loss, metrics = ppo_loss(
        logprobs, torch.zeros(1, 2), torch.zeros(1), torch.ones(1, 2), kl_coef=0.5, kl_type=kl_type, ref_logprobs=ref
    )
    loss.backward()
    assert loss.item() == pytest.approx(0.5 * value)
    assert metrics["kl"].item() == pytest.approx(value)
    assert logprobs.grad.tolist() == [pytest.approx([0.5 * grad / 2] * 2)]
    with pytest.raises(ValueError, match="ref_logprobs"):
        ppo_loss(logprobs, torch.zeros(1, 2), torch.zeros(1), torch.ones(1, 2), kl_coef=0.5)


def test_entropy_bonus_is_subtracted():
    entropy = _leaf([[1.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, metrics = ppo_loss(
        torch.zeros(1, 3), torch.zeros(1, 3), torch.zeros(1), mask, entropy=entropy, entropy_coef=0.1
    )
    loss.backward()
    assert loss.item() == pytest.approx(-0.1 * 2.0)
    assert metrics["entropy"].item() == pytest.approx(2.0)
    assert entropy.grad.tolist() == [pytest.approx([-0.05, -0.05, 0.0])]


def test_aggregate_loss_rejects_bad_input():
    values, mask = torch.ones(2, 2), torch.ones(2, 2)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        aggregate_loss(values, mask, "sum")
    with pytest.raises(ValueError, match="num_tokens"):
        aggregate_loss(values, mask, num_tokens=0)
    with pytest.raises(ValueError, match="advantages"):
        ppo_loss(values, values, torch.ones(3), mask)
    with pytest.raises(ValueError, match="old_logprobs"):
        ppo_loss(values, torch.ones(2, 3), torch.ones(2), mask)
