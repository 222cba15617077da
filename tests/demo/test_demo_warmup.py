"""The warm-up mixture: each solution kind gets its configured share, bad shares are refused, a result is reused."""

from dataclasses import replace

import pytest

from fapo_megatron.data.arith import TRIVIAL_SLIP, WRONG_ANSWER
from fapo_megatron.demo.warmup import WarmupConfig, _solution_kind, warm_up


def test_each_kind_gets_its_share_of_uniform_draws():
    cfg = WarmupConfig(
        clean_share=0.3, flaw_shares=(("skipped_trivial", 0.1), ("bare_trivial", 0.2)), trivial_slip_share=0.15
    )
    draws = [(i + 0.5) / 1000 for i in range(1000)]
    kinds = [_solution_kind(cfg, d) for d in draws]
    counts = {kind: kinds.count(kind) for kind in set(kinds)}
    assert counts == {None: 300, "skipped_trivial": 100, "bare_trivial": 200, TRIVIAL_SLIP: 150, WRONG_ANSWER: 250}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"flaw_shares": (("typo", 0.1),)}, "'typo' is not one of"),
        ({"flaw_shares": (("wrong_answer", 0.1),)}, "'wrong_answer' is not one of"),
        ({"flaw_shares": (("bare_trivial", 0.1),), "identity_steps": 0}, "needs identity_steps"),
        ({"flaw_shares": (), "identity_steps": 0}, "trivial_slip_share: a slip at the trivial step needs"),
        ({"trivial_slip_share": -0.1}, "each share >= 0"),
        ({"flaw_shares": (("bare_trivial", -0.1),)}, "must be >= 0"),
        ({"clean_share": 0.8, "flaw_shares": (("bare_trivial", 0.3),)}, "must lie in"),
    ],
)
def test_bad_mixture_is_refused_naming_the_entry(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WarmupConfig(**kwargs)


def test_a_finished_warm_up_is_reused_and_a_changed_config_retrains(tmp_path):
    cfg = WarmupConfig(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, ffn_size=32, num_items=40, steps=2)
    out = warm_up(tmp_path, cfg, progress=False)
    weights = out / "model.safetensors"
    first = weights.stat().st_mtime_ns
    assert warm_up(tmp_path, cfg, progress=False) == out and weights.stat().st_mtime_ns == first
    warm_up(tmp_path, replace(cfg, steps=3), progress=False)
    assert weights.stat().st_mtime_ns != first
