"""Breakdown arithmetic on a hand-written metrics.jsonl, the FLOPs/MFU formulas on hand-computed shapes, the
prompt-token replay, and the `bench breakdown` command."""

import json

import pytest
from tiny_spec import TINY

from fapo_megatron.bench.breakdown import COLUMNS, breakdown_run, format_table, step_breakdown
from fapo_megatron.bench.cost_model import CostAssumptions, assumptions_with
from fapo_megatron.bench.flops import forward_flops_per_token, matmul_params, mfu, train_flops_per_token
from fapo_megatron.cli import main
from fapo_megatron.config import ConfigError, dump_yaml, load_config
from fapo_megatron.models.spec import model_spec

# batch 4 prompts x n 2 = 8 rollouts per step, 2 devices
OVERRIDES = [
    "data.batch_size=4",
    "rollout.n=2",
    "algorithm.mini_batch_size=2",
    "cluster.devices_per_node=2",
    "model.dtype=float32",
    "rollout.max_response_tokens=64",
    "algorithm.overlong.buffer=16",
]

RECORDS = [
    # rollout 2 + genrm 1 + logprobs 1 + update 3 + sync 0.5 = 7.5 timed of 8 s: idle 0.5
    {
        "step": 1,
        "time/rollout": 2.0,
        "time/genrm": 1.0,
        "time/logprobs": 1.0,
        "time/update": 3.0,
        "time/weight_sync": 0.5,
        "perf/step_seconds": 8.0,
        "perf/tokens_per_second": 10.0,
        "genrm/asked": 4.0,
        "genrm/output_tokens": 40.0,
        "reward/accuracy": 0.5,
        "weight_sync/bytes": 1e9,
    },
    # 8 timed + validation 1 + checkpoint 1; wall 9 + 2 = 11: idle 1; one rollout dropped
    {
        "step": 2,
        "time/rollout": 4.0,
        "time/genrm": 0.5,
        "time/logprobs": 1.0,
        "time/update": 2.0,
        "time/weight_sync": 0.5,
        "time/validation": 1.0,
        "time/checkpoint": 1.0,
        "perf/step_seconds": 9.0,
        "perf/tokens_per_second": 20.0,
        "reward/num_dropped": 1.0,
        "genrm/asked": 2.0,
        "genrm/output_tokens": 20.0,
        "reward/accuracy": 0.25,
        "weight_sync/bytes": 1e9,
    },
]


def _write_run(tmp_path, records=RECORDS, overrides=OVERRIDES):
    cfg = load_config(None, overrides)
    (tmp_path / "config.yaml").write_text(dump_yaml(cfg))
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return cfg


def test_matmul_params_and_flops_by_hand():
    # per layer: q,k,v 4 x (4 + 2 + 2) = 32, o 4 x 4 = 16, SwiGLU 3 x 4 x 8 = 96 -> 144; 2 layers + head 10 x 4
    assert matmul_params(TINY) == 2 * 144 + 40
    # forward at S = 6: 2 x 328 + 2 x layers 2 x q_dim 4 x 6 = 656 + 96
    assert forward_flops_per_token(TINY, 6) == 752
    assert train_flops_per_token(TINY, 6) == 3 * 752


def test_flops_match_the_published_1p5b_figure():
    """RESULTS.md: Qwen2.5-1.5B shape at 4096 tokens is 10.32 GFLOP/token (fwd + bwd)."""
    shape = model_spec(
        {
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": 1536,
            "num_hidden_layers": 28,
            "num_attention_heads": 12,
            "num_key_value_heads": 2,
            "intermediate_size": 8960,
            "vocab_size": 151936,
        },
        "1.5b",
    )
    # 28 x (1536 x 2048 + 1536^2 + 3 x 1536 x 8960) + 151936 x 1536 = 1,543,569,408 matmul params
    assert matmul_params(shape) == 1_543_569_408
    assert train_flops_per_token(shape, 4096) == 6 * 1_543_569_408 + 6 * 28 * 1536 * 4096
    assert round(train_flops_per_token(shape, 4096) / 1e9, 2) == 10.32


def test_mfu():
    assert mfu(1e15, 2.0, 2, 250.0) == pytest.approx(1.0)
    assert mfu(1e15, 0.0, 2, 250.0) == 0.0


def test_step_breakdown_columns_by_hand():
    cfg = load_config(None, OVERRIDES)
    first = step_breakdown(RECORDS[0], cfg)
    assert first.seconds == {
        "rollout": 2.0,
        "genrm_visible": 1.0,  # a record without time/genrm_visible judged synchronously
        "logprobs": 1.0,
        "update": 3.0,
        "weight_sync": 0.5,
        "val_ckpt": 0.0,
        "idle": 0.5,
    }
    assert first.genrm_busy_seconds == 1.0
    assert first.wall_seconds == 8.0 and first.response_tokens == 80.0 and first.sequences == 8
    second = step_breakdown(RECORDS[1], cfg, lambda step, seqs: 10.0 * seqs)
    assert second.seconds["val_ckpt"] == 2.0 and second.seconds["idle"] == 1.0 and second.wall_seconds == 11.0
    assert second.response_tokens == 180.0 and second.sequences == 7 and second.prompt_tokens == 70.0


def test_streamed_verdicts_sum_visible_time_and_show_busy_time_beside():
    """Busy 3 s of which 0.5 s visible: the columns sum the visible wait (2 + 0.5 + 1 + 3 + 0.5 = 7 of 8 s)."""
    record = dict(RECORDS[0], **{"time/genrm": 3.0, "time/genrm_visible": 0.5})
    step = step_breakdown(record, load_config(None, OVERRIDES))
    assert step.seconds["genrm_visible"] == 0.5 and step.genrm_busy_seconds == 3.0
    assert step.wall_seconds == 8.0 and step.seconds["idle"] == 1.0


def test_timed_phases_over_step_seconds_give_no_negative_idle():
    """The first step's weight_sync also holds the initial push before the loop."""
    record = dict(RECORDS[0], **{"time/weight_sync": 3.0})  # 10 s timed, 8 s step
    step = step_breakdown(record, load_config(None, OVERRIDES))
    assert step.wall_seconds == 10.0 and step.seconds["idle"] == 0.0


def test_missing_timer_is_an_error_naming_step_and_key():
    record = {k: v for k, v in RECORDS[1].items() if k != "perf/step_seconds"}
    with pytest.raises(ValueError, match=r"step 2: no 'perf/step_seconds'"):
        step_breakdown(record, load_config(None, OVERRIDES))


def test_run_breakdown_shares_tokens_and_mfu(tmp_path):
    _write_run(tmp_path)
    run = breakdown_run(tmp_path, skip_first=0, peak_tflops=1e-9, prompt_tokens_mean=10.0)
    assert run.world_size == 2 and run.prompt_tokens_source.startswith("given")
    # totals over both steps: wall 8 + 11 = 19; rollout 6, genrm 1.5, logprobs 2, update 5, sync 1, val_ckpt 2,
    # idle 1.5
    expected = {
        "rollout": 6,
        "genrm_visible": 1.5,
        "logprobs": 2,
        "update": 5,
        "weight_sync": 1,
        "val_ckpt": 2,
        "idle": 1.5,
    }
    assert {c: run.shares[c] for c in COLUMNS} == pytest.approx({k: v / 19 for k, v in expected.items()})
    assert sum(run.shares[c] for c in COLUMNS) == pytest.approx(1.0)
    assert run.genrm_busy_share == pytest.approx(1.5 / 19)
    assert run.mean_seconds["rollout"] == 3.0 and run.mean_wall_seconds == 9.5
    # response tokens 80 + 180 = 260 over 19 s on 2 devices
    assert run.throughput["response_tokens_per_s"] == pytest.approx(260 / 19)
    assert run.throughput["response_tokens_per_s_per_device"] == pytest.approx(130 / 19)
    assert run.throughput["rollout_tokens_per_s_per_device"] == pytest.approx(260 / 6 / 2)
    assert run.throughput["genrm_output_tokens_per_s"] == pytest.approx(60 / 1.5)
    # actor tokens: response 260 + prompt 10 x (8 + 7) = 410 over 15 sequences; the tiny random llama shape
    seq = 410 / 15
    assert run.flops_per_token["mean_sequence_tokens"] == pytest.approx(seq)
    from fapo_megatron.bench.breakdown import policy_shape

    shape = policy_shape(load_config(None, OVERRIDES))
    update_flops = 410 * train_flops_per_token(shape, seq)
    logprob_flops = 410 * forward_flops_per_token(shape, seq)
    peak = 2 * 1e-9 * 1e12  # 2 devices x 1000 FLOP/s
    assert run.mfu["update"] == pytest.approx(update_flops / 5 / peak)
    assert run.mfu["logprobs"] == pytest.approx(logprob_flops / 2 / peak)
    assert run.mfu["actor"] == pytest.approx((update_flops + logprob_flops) / 7 / peak)
    measured = run.measured
    assert measured["accuracy"] == pytest.approx(0.375)
    assert measured["response_tokens_mean"] == pytest.approx(260 / 15)
    assert measured["prompt_tokens_mean"] == pytest.approx(10.0)
    assert measured["weight_sync_gb_per_s"] == pytest.approx(2.0)  # 2 GB over 1 s
    assert measured["genrm_output_tokens_mean"] == pytest.approx(10.0)
    assert measured["genrm_tokens_per_s_per_gpu"] == pytest.approx(60 / 1.5 / 2)
    assumptions_with(CostAssumptions(), measured)  # every measured name is a cost-model input


def test_ledger_is_printed_beside_slurm_size(tmp_path):
    """The tiny random llama at TP 1, fp32, no distributed optimizer: 2 layers of 36992 parameters (attention
    64 x 128 + 64 x 64, SwiGLU 3 x 64 x 128, two norms of 64), tied embedding 128 x 64, final norm 64: 82240
    parameters, 4 B each, gradients 4 B, Adam's two moments 8 B."""
    params = 82240 * 4
    logged = {"rollout": 0.0, "genrm": 0.0, "logprobs": 330000.0, "update": 1320000.0, "weight_sync": 330000.0}
    records = [
        dict(r, **{f"memory/{phase}/actor_bytes": value * r["step"] for phase, value in logged.items()})
        for r in RECORDS
    ]
    _write_run(tmp_path, records, [*OVERRIDES, "parallel.use_distributed_optimizer=false"])
    run = breakdown_run(tmp_path, skip_first=0, replay=False)
    rows = {row.phase: row for row in run.memory}
    assert list(rows) == ["rollout", "genrm", "logprobs", "update", "weight_sync"]
    assert {p: r.predicted_bytes for p, r in rows.items()} == {
        "rollout": 0,
        "genrm": 0,
        "logprobs": params,
        "update": 4 * params,
        "weight_sync": params,
    }
    assert {p: r.actor_bytes for p, r in rows.items()} == {p: 2 * v for p, v in logged.items()}  # the larger step
    assert all(r.device_peak_bytes is None for r in run.memory)  # a CPU run logs no allocator peak
    table = format_table(run).splitlines()
    assert table[-6].split() == ["memory", "actor", "(ledger)", "slurm", "size", "ratio", "device", "peak"]
    assert table[-3].split() == ["logprobs", "0.660", "MB", "0.329", "MB", f"{660000 / params:.3f}", "n/a"]
    assert table[-5].split() == ["rollout", "0.000", "MB", "0.000", "MB", "-", "n/a"]
    assert run.to_json()["memory"][3] == {
        "phase": "update",
        "actor_bytes": 2640000.0,
        "predicted_bytes": 4 * params,
        "device_peak_bytes": None,
    }


def test_cpu_run_reports_no_mfu_and_skip_first(tmp_path):
    _write_run(tmp_path)
    run = breakdown_run(tmp_path, skip_first=1, replay=False)
    assert [s.step for s in run.steps] == [2] and run.mfu["actor"] is None
    assert run.prompt_tokens_source == "none" and "prompt_tokens_mean" not in run.measured
    with pytest.raises(ConfigError, match="none left after --skip-first 2"):
        breakdown_run(tmp_path, skip_first=2)


def test_replayed_prompt_tokens_count_each_prompt_n_times(tmp_path):
    """One batch per epoch (batch = all items): every step sees every prompt once, in a new order."""
    from fapo_megatron.bench.replay import replay_prompt_tokens
    from fapo_megatron.data.templates import encode_prompt, load_tokenizer
    from fapo_megatron.run_setup import load_train_val

    cfg = load_config(None, [*OVERRIDES, "data.arith_num_train=4"])
    train, _ = load_train_val(cfg.data)
    tokenizer = load_tokenizer(cfg)
    lengths = [len(encode_prompt(item, tokenizer)) for item in train]
    assert replay_prompt_tokens(cfg, 3) == [2 * sum(lengths)] * 3
    short = load_config(None, [*OVERRIDES, "data.arith_num_train=4", f"rollout.max_prompt_tokens={min(lengths)}"])
    assert replay_prompt_tokens(short, 1) == [2 * min(lengths) * lengths.count(min(lengths))]


def test_breakdown_command_writes_json_and_png(tmp_path, capsys):
    _write_run(tmp_path)
    assert main(["bench", "breakdown", str(tmp_path), "--skip-first", "0", "--peak-tflops", "1e-9"]) == 0
    printed = capsys.readouterr().out
    assert "share" in printed and "actor MFU vs 1e-09 TFLOP/s" in printed
    saved = json.loads((tmp_path / "bench" / "breakdown.json").read_text())
    assert saved["shares"]["rollout"] == pytest.approx(6 / 19) and set(saved["shares"]) == set(COLUMNS)
    assert saved["prompt_tokens_source"] == "replayed prompt sampler"
    png = (tmp_path / "bench" / "breakdown.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_breakdown_command_on_a_folder_that_is_no_run(tmp_path, capsys):
    assert main(["bench", "breakdown", str(tmp_path)]) == 2
    assert "config.yaml: not found" in capsys.readouterr().err
