"""The cost model: exact phase seconds for a hand-set assumption set, monotonicity, the GenRM frontier's closed
form, the shipped recipes, and the `bench predict` command."""

import dataclasses
import json
import math

import pytest
from tiny_spec import TINY

from fapo_megatron.bench.cost_model import (
    CostAssumptions,
    assumptions_with,
    load_assumptions,
    predict,
    recipe_config,
    shapes_for,
)
from fapo_megatron.bench.cost_report import genrm_frontier
from fapo_megatron.cli import main
from fapo_megatron.config import ConfigError, load_config

# 4 prompts x 2 rollouts = 8 rollouts on 1 node x 2 GPUs; responses up to 100 tokens; GenRM budget 64
CFG = load_config(
    None,
    [
        "data.batch_size=4",
        "rollout.n=2",
        "algorithm.mini_batch_size=2",
        "cluster.devices_per_node=2",
        "rollout.max_response_tokens=100",
        "genrm.max_new_tokens=64",
        "algorithm.overlong.buffer=16",
    ],
)

HAND = CostAssumptions(
    peak_tflops=1e-9,  # 1000 FLOP/s per GPU
    actor_mfu=0.5,
    logprob_mfu=0.25,
    prompt_tokens_mean=10,
    response_tokens_mean=40,
    accuracy=0.5,
    rollout_tokens_per_s_per_gpu=10,
    genrm_tokens_per_s_per_gpu=20,
    hbm_tb_per_s=7.76e-10,  # 776 B/s: one 2 x 388-byte weight read per token = 1 token/s on one GPU
    decode_bandwidth_efficiency=1.0,
    prefill_mfu=1.0,
    genrm_output_tokens_mean=30,
    genrm_longest_tokens=50,
    genrm_prompt_overhead_tokens=10,
    weight_sync_gb_per_s=3.88e-7,  # 388 B/s
    engine_switch_seconds=1.0,
)


def test_hand_computed_phases():
    assert TINY.num_params == 388
    pred = predict(CFG, HAND, TINY, TINY)
    # rollout: switch 1 + prefill 8 x 10 x 2 x 388 / (2 x 1000) = 31.04 + bulk 8 x 40 / (2 x 10) = 16
    #          + tail (100 - 40) / 1 = 60
    assert pred.seconds["rollout"] == pytest.approx(1 + 31.04 + 16 + 60)
    # GenRM: 0.5 x 8 = 4 verdicts; prefill 4 x (50 + 10) x 776 / 2000 = 93.12; bulk 4 x 30 / (2 x 20) = 3;
    #        tail (50 - 30) / 1 = 20
    assert pred.seconds["genrm"] == pytest.approx(1 + 93.12 + 3 + 20)
    # sequence 50 tokens: forward 2 x 328 + 2 x 2 x 4 x 50 = 1456 FLOPs/token, training 4368
    assert pred.seconds["logprobs"] == pytest.approx(8 * 50 * 1456 / (2000 * 0.25))  # 1164.8
    assert pred.seconds["update"] == pytest.approx(8 * 50 * 4368 / (2000 * 0.5))  # 1747.2
    assert pred.seconds["weight_sync"] == pytest.approx(2.0)  # 776 bytes at 388 B/s
    assert pred.step_seconds == pytest.approx(108.04 + 117.12 + 1164.8 + 1747.2 + 2)
    assert sum(pred.shares.values()) == pytest.approx(1.0)


def test_recompute_ppo_epochs_and_no_genrm():
    full = dataclasses.replace(CFG, parallel=dataclasses.replace(CFG.parallel, recompute="full"))
    assert predict(full, HAND, TINY, TINY).seconds["update"] == pytest.approx(1747.2 * 4 / 3)
    two = dataclasses.replace(CFG, algorithm=dataclasses.replace(CFG.algorithm, ppo_epochs=2))
    assert predict(two, HAND, TINY, TINY).seconds["update"] == pytest.approx(2 * 1747.2)
    assert predict(CFG, HAND, TINY, None).seconds["genrm"] == 0.0


def _with(cfg, **sections):
    return dataclasses.replace(cfg, **{k: dataclasses.replace(getattr(cfg, k), **v) for k, v in sections.items()})


def test_lognormal_lengths_priced_packed_and_padded_against_closed_forms():
    """Lognormal responses (mean 40, sigma 0.5, budget far above): packed, a row's forward FLOPs average to
    a (P + m) + b E[(P + L)^2] with E[L^2] = m^2 exp(sigma^2); padded, every row of the update's 4-row mini-batch
    is computed at P + E[longest of 4] and the log-prob pass's 8 rows at P + E[longest of 8]; for two draws
    E[max] = 2 m Phi(sigma / sqrt 2)."""
    from statistics import NormalDist

    from fapo_megatron.bench.cost_model import expected_longest, response_lengths

    sigma, m, p = 0.5, 40.0, 10.0
    spread = dataclasses.replace(HAND, response_tokens_sigma=sigma)
    wide = _with(CFG, rollout={"max_response_tokens": 10**6})
    lengths = response_lengths(spread, 10**6)
    assert sum(lengths) / len(lengths) == pytest.approx(m, rel=1e-3)
    assert expected_longest(lengths, 1) == pytest.approx(m, rel=1e-3)
    assert expected_longest(lengths, 2) == pytest.approx(2 * m * NormalDist().cdf(sigma / 2**0.5), rel=1e-3)

    a, b = 2 * 328, 2 * 2 * 4  # forward FLOPs per token: a + b x sequence length
    packed = predict(_with(wide, parallel={"max_tokens_per_micro_batch": 256}), spread, TINY, None)
    second_moment = p * p + 2 * p * m + m * m * math.exp(sigma * sigma)
    assert packed.seconds["logprobs"] == pytest.approx(8 * (a * (p + m) + b * second_moment) / 500, rel=1e-3)
    assert packed.seconds["update"] == pytest.approx(8 * 3 * (a * (p + m) + b * second_moment) / 1000, rel=1e-3)

    padded = predict(wide, spread, TINY, None)
    for phase, rows, rate, train in (("logprobs", 8, 500, 1), ("update", 4, 1000, 3)):
        seq = p + expected_longest(lengths, rows)
        assert seq > p + m * 1.3  # the longest of 4 or 8 is well past the mean
        assert padded.seconds[phase] == pytest.approx(8 * train * seq * (a + b * seq) / rate, rel=1e-9)
        assert padded.seconds[phase] > packed.seconds[phase]


def test_length_spread_capped_at_the_budget_and_zero_spread_is_the_mean():
    from fapo_megatron.bench.cost_model import response_lengths

    assert response_lengths(HAND, 100) == [40]
    capped = response_lengths(dataclasses.replace(HAND, response_tokens_sigma=1.5), 100)
    assert max(capped) == 100 and sum(capped) / len(capped) < 40
    packed = _with(CFG, parallel={"max_tokens_per_micro_batch": 256})
    assert predict(packed, HAND, TINY, TINY).seconds == predict(CFG, HAND, TINY, TINY).seconds


def test_budget_caps_the_genrm_output():
    """genrm.max_new_tokens 20 < the mean 30: every verdict stops at 20 tokens, no tail."""
    capped = dataclasses.replace(CFG, genrm=dataclasses.replace(CFG.genrm, max_new_tokens=20))
    assert predict(capped, HAND, TINY, TINY).seconds["genrm"] == pytest.approx(1 + 93.12 + 4 * 20 / 40)


def test_monotone_in_nodes_throughput_budget_and_accuracy():
    cfg_of = {n: recipe_config("qwen2.5-math-7b", n, 8) for n in (1, 2, 4, 8)}
    policy, genrm = shapes_for(cfg_of[4])
    a = CostAssumptions()
    steps = [predict(cfg_of[n], a, policy, genrm).step_seconds for n in (1, 2, 4, 8)]
    assert steps == sorted(steps, reverse=True) and len(set(steps)) == 4
    cfg = cfg_of[4]
    shares = [
        predict(cfg, dataclasses.replace(a, genrm_tokens_per_s_per_gpu=r), policy, genrm).shares["genrm"]
        for r in (1000, 4000, 16000)
    ]
    assert shares == sorted(shares, reverse=True)
    by_budget = []
    for budget in (2048, 8192, 16384):
        cfg_b = dataclasses.replace(cfg, genrm=dataclasses.replace(cfg.genrm, max_new_tokens=budget))
        by_budget.append(predict(cfg_b, dataclasses.replace(a, genrm_longest_tokens=budget), policy, genrm))
    assert [p.seconds["genrm"] for p in by_budget] == sorted(p.seconds["genrm"] for p in by_budget)
    genrm_s = [predict(cfg, dataclasses.replace(a, accuracy=x), policy, genrm).seconds["genrm"] for x in (0.2, 0.8)]
    assert genrm_s[0] < genrm_s[1]
    faster_actor = predict(cfg, dataclasses.replace(a, actor_mfu=0.5), policy, genrm).seconds["update"]
    assert faster_actor == pytest.approx(predict(cfg, a, policy, genrm).seconds["update"] * 0.28 / 0.5)


def test_frontier_rate_gives_exactly_the_target_share():
    cfg = recipe_config("qwen2.5-32b", None, 8)
    policy, genrm = shapes_for(cfg)
    rows = genrm_frontier(cfg, CostAssumptions(), policy, genrm, [4096, 16384], 0.10)
    for row in rows:
        at = dataclasses.replace(
            CostAssumptions(), genrm_tokens_per_s_per_gpu=row.min_rate, genrm_longest_tokens=row.max_new_tokens
        )
        cfg_b = dataclasses.replace(cfg, genrm=dataclasses.replace(cfg.genrm, max_new_tokens=row.max_new_tokens))
        assert predict(cfg_b, at, policy, genrm).shares["genrm"] == pytest.approx(0.10, rel=1e-9)
    assert genrm_frontier(cfg, CostAssumptions(), policy, genrm, [16384], 0.001)[0].min_rate is None


def test_shipped_recipes_resolve_their_shapes_and_nodes():
    cfg = recipe_config("qwen2.5-32b", None, 8)
    policy, genrm = shapes_for(cfg)
    assert cfg.cluster.world_size == 64 and policy.name == "qwen2.5-32b" and genrm.name == "qwen3-4b"
    assert recipe_config("qwen2.5-math-7b", 2, 8).cluster.world_size == 16
    with pytest.raises(ConfigError, match="does not split evenly"):
        recipe_config("qwen2.5-32b", 3, 8)


def test_assumption_overrides_are_checked(tmp_path):
    assert assumptions_with(HAND, {"accuracy": 1}).accuracy == 1.0
    with pytest.raises(ConfigError, match="unknown cost assumption 'acuracy'"):
        assumptions_with(HAND, {"acuracy": 0.3})
    with pytest.raises(ConfigError, match="actor_mfu must be > 0"):
        assumptions_with(HAND, {"actor_mfu": 0})
    path = tmp_path / "b.json"
    path.write_text(json.dumps({"shares": {}, "measured": {"actor_mfu": 0.4}}))
    assert load_assumptions(path) == {"actor_mfu": 0.4}


def test_predict_command_prints_paper_splits_and_writes_json(tmp_path, capsys):
    out = tmp_path / "pred.json"
    assert main(["bench", "predict", "--set", "actor_mfu=0.3", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    for paper in ("42 %", "18 %", "33 %", "60 %", "14 %", "20 %"):
        assert paper in printed
    saved = json.loads(out.read_text())
    assert set(saved["predictions"]) == {"qwen2.5-math-7b", "qwen2.5-32b"}
    assert saved["assumptions"]["actor_mfu"] == 0.3
    big = saved["predictions"]["qwen2.5-32b"]
    assert big["gpus"] == 64 and big["paper_shares"]["rollout"] == 0.60
    assert [r["max_new_tokens"] for r in big["genrm_frontier"]] == [4096, 8192, 16384]


def test_predict_command_errors(capsys):
    assert main(["bench", "predict", "--set", "actor_mfu"]) == 2
    assert "expected NAME=NUMBER" in capsys.readouterr().err
    assert main(["bench", "predict", "--model", "qwen2.5-32b", "--nodes", "3"]) == 2
    assert "cluster.num_nodes=3" in capsys.readouterr().err
