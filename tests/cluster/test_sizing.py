"""Per-GPU memory estimate: published parameter counts, hand-computed lines, and every shipped config fits 80 GB."""

import json
from pathlib import Path

import pytest

from fapo_megatron.cli import main
from fapo_megatron.cluster.preflight import check_plan
from fapo_megatron.cluster.sizing import SHAPES, estimate, estimate_for_config, resolve_shape
from fapo_megatron.config import ConfigError, load_config
from fapo_megatron.models.spec import model_spec

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
# Training recipes for GPUs; genrm_eval_* configs only serve a judge to `eval-genrm` and train nothing.
GPU_CONFIGS = [
    path for path in CONFIGS if load_config(path).cluster.device == "cuda" and not path.name.startswith("genrm_eval_")
]


def test_parameter_counts_match_the_model_cards():
    # Qwen2.5-7B card: 7.61B total, 6.53B non-embedding; Qwen3-4B card: 4.0B total, 3.6B non-embedding;
    # Qwen2.5-32B safetensors: 32.76B.
    seven, four, big = SHAPES["qwen2.5-math-7b"], SHAPES["qwen3-4b"], SHAPES["qwen2.5-32b"]
    assert seven.num_params / 1e9 == pytest.approx(7.61, abs=0.01)
    assert seven.num_layers * seven.layer_params / 1e9 == pytest.approx(6.53, abs=0.01)
    assert four.num_params / 1e9 == pytest.approx(4.02, abs=0.01)
    assert four.num_layers * four.layer_params / 1e9 == pytest.approx(3.6, abs=0.05)
    assert big.num_params / 1e9 == pytest.approx(32.76, abs=0.01)


def test_shape_from_hf_config_json_wins_over_the_builtin(tmp_path):
    raw = {
        "model_type": "qwen3",
        "hidden_size": 2560,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 9728,
        "vocab_size": 151936,
        "head_dim": 128,
        "tie_word_embeddings": True,
    }
    (tmp_path / "config.json").write_text(json.dumps(raw))
    shape = resolve_shape(str(tmp_path), "qwen2.5-32b", "sizing.model_shape")
    assert shape.num_params == SHAPES["qwen3-4b"].num_params
    with pytest.raises(ConfigError, match=r"sizing.model_shape: /nowhere/config.json is not readable and no built-in"):
        resolve_shape("/nowhere", "", "sizing.model_shape")


def test_lines_match_a_hand_computation():
    shape = model_spec(
        {
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": 1024,
            "num_hidden_layers": 4,
            "num_attention_heads": 8,
            "num_key_value_heads": 8,
            "intermediate_size": 4096,
            "vocab_size": 32000,
        },
        "toy",
    )
    n = 4 * (4 * 1024 * 1024 + 3 * 1024 * 4096 + 2 * 1024) + 2 * 32000 * 1024 + 1024
    assert shape.num_params == n
    cfg = load_config(
        REPO / "configs" / "qwen2.5-math-7b_grpo.yaml",
        [
            "parallel.tp=2",
            "parallel.recompute=none",
            "parallel.sequence_parallel=false",
            "cluster.num_nodes=1",
            "cluster.devices_per_node=8",
            "rollout.max_prompt_tokens=1000",
            "rollout.max_response_tokens=1000",
            "rollout.tp=1",
            "rollout.mem_fraction=0.5",
            "sizing.runtime_overhead_gb=0",
            "algorithm.overlong.buffer=500",
        ],
    )
    report = estimate(cfg, shape, None)
    train = {name: gb for name, gb, _ in report.phases[0].lines}
    assert train["params"] == pytest.approx(n / 2 * 2 / 1e9)
    assert train["grads"] == pytest.approx(n / 2 * 4 / 1e9)
    assert train["optimizer"] == pytest.approx(n / 2 * 12 / 4 / 1e9)  # dp = 8 / 2
    # per layer per token, bf16: 4h replicated (no SP) + (2 q + 2 kv + 4 ffn) / t; 4 layers; T = 2000 tokens
    per_token_layer = 2 * (4 * 1024 + (2 * 1024 + 2 * 1024 + 4 * 4096) / 2)
    assert train["activations"] == pytest.approx(per_token_layer * 2000 * 4 / 1e9)
    assert train["logits"] == pytest.approx(2000 * 32000 / 2 * 4 * 2 / 1e9)
    rollout = {name: gb for name, gb, _ in report.phases[1].lines}
    assert rollout["toy weights"] == pytest.approx(n * 2 / 1e9)
    assert rollout["KV cache"] == pytest.approx(0.5 * 80 - n * 2 / 1e9)
    push = {name: gb for name, gb, _ in report.phases[2].lines}
    assert push["engine weights"] == pytest.approx(n * 2 / 1e9)


def test_a_rollout_pool_of_its_own_takes_the_engine_off_the_actor_gpus():
    recipe = REPO / "configs" / "qwen2.5-math-7b_grpo.yaml"
    shape = SHAPES["qwen2.5-math-7b"]
    colocated = estimate(load_config(recipe), shape, None)
    separate = estimate(load_config(recipe, ["rollout.placement=separate", "cluster.rollout_devices=8"]), shape, None)
    names = [p.name for p in separate.phases]
    assert names[1] == "rollout (own pool)" and [p.name for p in colocated.phases][1] == "rollout"
    own = {name: gb for name, gb, _ in separate.phases[1].lines}
    bucket_mb = load_config(recipe).rollout.weight_sync_bucket_mb
    assert own["bucket"] == pytest.approx(bucket_mb * 2**20 / 1e9)
    assert not any(name.startswith("actor ") for name in own)
    colocated_push = {name: gb for name, gb, _ in colocated.phases[2].lines}
    separate_push = {name: gb for name, gb, _ in separate.phases[2].lines}
    assert set(colocated_push) - set(separate_push) == {"engine weights"}
    assert separate.phases[2].total_gb == pytest.approx(
        colocated.phases[2].total_gb - colocated_push["engine weights"]
    )


def test_packed_micro_batches_priced_at_their_token_budget_or_one_full_row():
    """Padded: T = micro_batch_size x (1000 + 1000); packed: the budget, or one 2000-token row when that is
    longer (it gets a micro-batch of its own)."""
    base = ["cluster.device=cuda", "cluster.devices_per_node=8", "parallel.tp=2", "sizing.model_shape=qwen2.5-32b"]
    base += ["rollout.max_prompt_tokens=1000", "rollout.max_response_tokens=1000", "parallel.micro_batch_size=4"]
    base += ["algorithm.overlong.buffer=500"]

    def train_gb(*overrides):
        cfg = load_config(None, base + list(overrides))
        lines = dict((name, gb) for name, gb, _ in estimate(cfg, SHAPES["qwen2.5-32b"], None).phases[0].lines)
        return lines["activations"], lines["logits"]

    padded = train_gb()
    vocab = SHAPES["qwen2.5-32b"].vocab_size / 2
    assert padded[1] == pytest.approx(8000 * vocab * 4 * 2 / 1e9)
    for budget, tokens in ((3000, 3000), (1500, 2000)):
        packed = train_gb(f"parallel.max_tokens_per_micro_batch={budget}")
        assert packed[0] == pytest.approx(padded[0] * tokens / 8000)
        assert packed[1] == pytest.approx(tokens * vocab * 4 * 2 / 1e9)


@pytest.mark.parametrize("path", GPU_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_gpu_recipe_is_valid_and_fits_80gb(path):
    cfg = load_config(path)
    report = estimate_for_config(cfg)
    assert report.gpu_memory_gb == 80
    assert report.fits, report.problems
    assert report.peak_gb <= 80
    assert check_plan(cfg, "n") == []
    text = path.read_text()
    assert f"= {report.peak_gb:.0f} GB" in text  # the sizing written out in the file matches the estimate


def test_every_shipped_config_loads():
    assert len(CONFIGS) >= 7
    for path in CONFIGS:
        load_config(path)


def test_a_plan_that_does_not_fit_says_which_phase_and_why(capsys):
    big = str(REPO / "configs" / "qwen2.5-32b_fapo.yaml")
    assert main(["slurm", "size", big, "parallel.tp=1", "parallel.sequence_parallel=false", "rollout.tp=1"]) == 1
    out = capsys.readouterr().out
    assert "problem: actor train phase needs" in out
    assert "problem: rollout engine: 0.6 x 80 GB leaves 0.0 GB of KV cache after 65.5 GB of weights" in out
    assert main(["slurm", "size", big]) == 0
    assert "peak 52.0 GB of 80 GB per GPU: fits" in capsys.readouterr().out


def test_gradient_dtype_moments_and_optimizer_offload_are_priced():
    """bf16 gradients halve the gradient buffer, bf16 moments take 2 + 2 of Adam's 12 bytes, and the hybrid
    optimizer's host share leaves the GPU."""
    base = ["cluster.device=cuda", "cluster.devices_per_node=8", "parallel.tp=2", "sizing.model_shape=qwen2.5-32b"]

    def train_lines(*overrides):
        cfg = load_config(None, base + list(overrides))
        return {name: gb for name, gb, _ in estimate(cfg, SHAPES["qwen2.5-32b"], None).phases[0].lines}

    plain = train_lines()
    per_rank = plain["params"] / 2  # bf16 parameters of the stage / t
    assert plain["grads"] == pytest.approx(per_rank * 4)
    assert plain["optimizer"] == pytest.approx(per_rank * 12 / 4)  # dp = 8 / 2
    assert train_lines("parallel.grad_reduce_in_fp32=false")["grads"] == pytest.approx(per_rank * 2)
    low = train_lines("optim.precision_aware=true", "optim.exp_avg_dtype=bfloat16", "optim.exp_avg_sq_dtype=bfloat16")
    assert low["optimizer"] == pytest.approx(per_rank * (4 + 2 + 2) / 4)
    offload = train_lines("optim.precision_aware=true", "optim.cpu_offload_fraction=0.75")
    assert offload["optimizer"] == pytest.approx(per_rank * 12 / 4 * 0.25)
    assert offload["params"] == plain["params"] and offload["grads"] == plain["grads"]


def test_chunked_logprobs_price_one_chunk_of_float32_work():
    base = ["cluster.device=cuda", "cluster.devices_per_node=8", "parallel.tp=2", "sizing.model_shape=qwen2.5-32b"]
    base += ["rollout.max_prompt_tokens=1024", "rollout.max_response_tokens=7168"]

    def logits(*overrides):
        cfg = load_config(None, base + list(overrides))
        lines = dict((name, gb) for name, gb, _ in estimate(cfg, SHAPES["qwen2.5-32b"], None).phases[0].lines)
        return lines["logits"]

    vocab = SHAPES["qwen2.5-32b"].vocab_size / 2
    assert logits() == pytest.approx(8192 * vocab * 4 * 2 / 1e9)
    assert logits("parallel.logprob_chunk_tokens=1024") == pytest.approx((8192 * 2 * 2 + 1024 * 4 * 2) * vocab / 1e9)
