"""Model registry (HF config -> megatron-core config and layer spec) and the TrainBatch helpers; single process."""

from __future__ import annotations

import pytest
import torch

from fapo_megatron.algo.batch import TrainBatch
from fapo_megatron.models import registry
from fapo_megatron.models.spec import UnsupportedModelError, model_spec, tiny_hf_config

QWEN25_15B = {
    "architectures": ["Qwen2ForCausalLM"],
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "use_sliding_window": False,
    "hidden_act": "silu",
}


def test_qwen2_spec_has_qkv_bias_gqa_and_tied_embeddings():
    spec = model_spec(QWEN25_15B)
    assert (spec.family, spec.qkv_bias, spec.qk_layernorm, spec.tie_embeddings) == ("qwen2", True, False, True)
    assert (spec.num_query_groups, spec.head_dim, spec.rope.theta) == (2, 128, 1e6)
    assert spec.padded_vocab_size(1) == spec.padded_vocab_size(8) == 151936


def test_qwen3_spec_uses_explicit_head_dim_and_qk_norm():
    spec = model_spec(tiny_hf_config("qwen3", head_dim=32))
    assert spec.qk_layernorm and not spec.qkv_bias and spec.head_dim == 32 and not spec.tie_embeddings


def test_llama_rope_scaling_llama3_and_linear():
    llama3 = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    spec = model_spec(tiny_hf_config("llama", rope_scaling=llama3))
    assert spec.rope.scaling == "llama3" and registry.gpt_model_kwargs(spec, tp=1)["rope_scaling_factor"] == 8.0
    linear = model_spec(tiny_hf_config("llama", rope_scaling={"type": "linear", "factor": 2.0}))
    assert registry.gpt_model_kwargs(linear, tp=1)["seq_len_interpolation_factor"] == 2.0


@pytest.mark.parametrize(
    "config, named",
    [
        ({"architectures": ["MistralForCausalLM"]}, "MistralForCausalLM"),
        (tiny_hf_config("llama", rope_scaling={"rope_type": "yarn", "factor": 4.0}), "yarn"),
        (
            tiny_hf_config("llama", rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0}),
            "low_freq_factor",
        ),
        (tiny_hf_config("qwen2", use_sliding_window=True), "use_sliding_window"),
        (tiny_hf_config("llama", mlp_bias=True), "mlp_bias"),
        (tiny_hf_config("llama", hidden_act="gelu"), "hidden_act"),
    ],
)
def test_unsupported_models_are_named(config, named):
    with pytest.raises(UnsupportedModelError, match=named):
        model_spec(config)


def test_transformer_config_and_local_spec_are_data():
    from fapo_megatron.models.attention import SDPACoreAttention

    spec = model_spec(tiny_hf_config("qwen3"))
    config = registry.transformer_config(spec, tp=2, pp=2, calculate_per_token_loss=True)
    assert (config.num_query_groups, config.kv_channels) == (2, 16)
    assert config.qk_layernorm and not config.add_qkv_bias
    assert config.normalization == "RMSNorm" and config.gated_linear_unit and config.hidden_dropout == 0.0
    layer = registry.layer_spec(spec, "local")
    attention = layer.submodules.self_attention.submodules
    assert attention.core_attention is SDPACoreAttention
    assert attention.q_layernorm is not None and attention.k_layernorm is not None
    if not registry.transformer_engine_available():
        with pytest.raises(UnsupportedModelError, match="transformer_engine"):
            registry.layer_spec(spec, "te")
    with pytest.raises(ValueError, match="pp=4"):
        registry.transformer_config(spec, pp=4 if spec.num_layers % 4 else 3)


def _batch(rows=4, seq=6) -> TrainBatch:
    lengths = torch.tensor([6, 4, 5, 3])[:rows]
    mask = torch.zeros(rows, seq)
    for row in range(rows):
        mask[row, 2 : lengths[row]] = 1.0
    return TrainBatch(
        tokens=torch.arange(rows * seq).view(rows, seq),
        lengths=lengths,
        response_mask=mask,
        advantages=torch.arange(rows, dtype=torch.float),
        group_ids=torch.tensor([0, 0, 1, 1])[:rows],
    )


def test_train_batch_slicing_and_counts():
    batch = _batch()
    assert batch.num_response_tokens == 4 + 2 + 3 + 1 and batch.num_response_sequences == 4
    assert batch.shard(1, 2).advantages.tolist() == [2.0, 3.0]
    assert [len(c) for c in batch.chunks(3)] == [3, 1]
    assert batch.select([3, 0]).lengths.tolist() == [3, 6]
    trimmed = _batch().select([1, 3]).trimmed()
    assert trimmed.tokens.shape == (2, 4) and trimmed.response_mask.shape == (2, 4)
    assert batch.attention_mask.sum().item() == 6 + 4 + 5 + 3


def test_train_batch_rejects_bad_input():
    batch = _batch()
    with pytest.raises(ValueError, match="advantages"):
        TrainBatch(
            tokens=batch.tokens,
            lengths=batch.lengths,
            response_mask=batch.response_mask,
            advantages=torch.zeros(3),
            group_ids=batch.group_ids,
        )
    bad_mask = batch.response_mask.clone()
    bad_mask[1, 5] = 1.0
    with pytest.raises(ValueError, match="padding"):
        TrainBatch(
            tokens=batch.tokens,
            lengths=batch.lengths,
            response_mask=bad_mask,
            advantages=batch.advantages,
            group_ids=batch.group_ids,
        )
    with pytest.raises(ValueError, match="split evenly"):
        batch.shard(0, 3)


@pytest.mark.parametrize(
    ("recompute", "num_layers", "expected"),
    [
        ("none", 1, (None, None, None)),
        ("selective", 1, ("selective", None, None)),
        ("full", 1, ("full", "uniform", 1)),
        ("full", 2, ("full", "uniform", 2)),
    ],
)
def test_parallel_recompute_reaches_the_actors_transformer_config_under_tp_and_pp(recompute, num_layers, expected):
    from fapo_megatron.config import load_config
    from fapo_megatron.megatron.actor import actor_transformer_config

    cfg = load_config(
        None,
        [
            "cluster.devices_per_node=4",
            "parallel.tp=2",
            "parallel.pp=2",
            f"parallel.recompute={recompute}",
            f"parallel.recompute_num_layers={num_layers}",
        ],
    )
    built = actor_transformer_config(cfg, model_spec(tiny_hf_config("qwen2", num_hidden_layers=4)))
    assert (built.recompute_granularity, built.recompute_method, built.recompute_num_layers) == expected
    assert (built.tensor_model_parallel_size, built.pipeline_model_parallel_size) == (2, 2)
    if recompute == "selective":
        assert built.recompute_modules == ["core_attn"]


def test_recompute_chunk_longer_than_a_pipeline_stage_names_the_key():
    with pytest.raises(ValueError, match="parallel.recompute_num_layers=3 .* 2 layers"):
        registry.transformer_config(
            model_spec(tiny_hf_config("llama", num_hidden_layers=4)), pp=2, recompute="full", recompute_num_layers=3
        )
