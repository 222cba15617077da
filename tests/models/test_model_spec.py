"""The one HF config parser: specs of published configs, parameter counts against HF's own models, and the
objects built from a spec (sizing, megatron-core config, HF name map) agreeing with it."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from fapo_megatron.cluster.sizing import SHAPES, resolve_shape
from fapo_megatron.config import ConfigError
from fapo_megatron.models import hf_mapping, registry
from fapo_megatron.models.spec import UnsupportedModelError, model_spec, tiny_hf_config

# Values of the public config.json files (Qwen/Qwen2.5-1.5B, Qwen/Qwen3-4B, meta-llama/Llama-3.1-8B).
QWEN25_15B = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "use_sliding_window": False,
    "hidden_act": "silu",
}
QWEN3_4B = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 2560,
    "intermediate_size": 9728,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "hidden_act": "silu",
}
LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "hidden_act": "silu",
}


def _fields(spec):
    return (
        spec.family,
        spec.hidden_size,
        spec.num_layers,
        spec.num_attention_heads,
        spec.num_query_groups,
        spec.head_dim,
        spec.ffn_hidden_size,
        spec.vocab_size,
        spec.qkv_bias,
        spec.qk_layernorm,
        spec.tie_embeddings,
        spec.rope.theta,
        spec.norm_eps,
    )


@pytest.mark.parametrize(
    "config, expected",
    [
        (QWEN25_15B, ("qwen2", 1536, 28, 12, 2, 128, 8960, 151936, True, False, True, 1e6, 1e-6)),
        (QWEN3_4B, ("qwen3", 2560, 36, 32, 8, 128, 9728, 151936, False, True, True, 1e6, 1e-6)),
        (LLAMA31_8B, ("llama", 4096, 32, 32, 8, 128, 14336, 128256, False, False, False, 5e5, 1e-5)),
    ],
)
def test_published_configs_parse_to_their_spec(config, expected):
    spec = model_spec(config)
    assert _fields(spec) == expected
    assert spec.name == spec.architecture == config["architectures"][0]


def test_llama31_rope_scaling_and_the_one_padding_rule():
    llama = model_spec(LLAMA31_8B)
    assert (llama.rope.scaling, llama.rope.factor, llama.max_position_embeddings) == ("llama3", 8.0, 131072)
    qwen = model_spec(QWEN3_4B)
    # lcm(128, tp) rows: 151936 = 1187 x 128 stays for every power of two (megatron-lm's 128 x tp would give
    # 152576 at tp=8); tp=3 needs a multiple of 384.
    assert [qwen.padded_vocab_size(tp) for tp in (1, 2, 8)] == [151936] * 3
    assert qwen.padded_vocab_size(3) == 152064 and qwen.padded_vocab_size(1, divisible_by=64) == 151936
    assert llama.padded_vocab_size(8) == 128256
    assert hf_mapping.MappingSpec.for_tp(qwen, 8).padded_vocab_size == 151936


def test_family_by_model_type_without_architectures_and_refusals_name_the_option():
    no_arch = {k: v for k, v in QWEN25_15B.items() if k != "architectures"}
    assert model_spec(no_arch).qkv_bias
    with pytest.raises(UnsupportedModelError, match="model_type 'gpt2'"):
        model_spec({"model_type": "gpt2"})
    with pytest.raises(UnsupportedModelError, match="attention_bias"):
        model_spec({**LLAMA31_8B, "attention_bias": True})
    assert model_spec({**QWEN25_15B, "attention_bias": True}).qkv_bias  # Qwen2's q/k/v biases are the family's
    with pytest.raises(UnsupportedModelError, match="not a multiple of num_key_value_heads=5"):
        model_spec({**LLAMA31_8B, "num_key_value_heads": 5})


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("tied", [False, True])
def test_parameter_count_equals_the_hf_models(family, tied):
    cfg = tiny_hf_config(family, tie_word_embeddings=tied)
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg))
    assert model_spec(cfg).num_params == sum(p.numel() for p in hf.parameters())


def test_sizing_registry_and_name_map_build_from_the_same_spec(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN3_4B))
    spec = model_spec(QWEN3_4B, str(tmp_path / "config.json"))
    assert resolve_shape(str(tmp_path), "", "sizing.model_shape") == spec
    assert SHAPES["qwen3-4b"].num_params == spec.num_params

    built = registry.transformer_config(spec, tp=2)
    assert (built.num_layers, built.hidden_size, built.ffn_hidden_size) == (36, 2560, 9728)
    assert (built.num_attention_heads, built.num_query_groups, built.kv_channels) == (32, 8, 128)
    assert (built.add_qkv_bias, built.qk_layernorm, built.layernorm_epsilon) == (False, True, 1e-6)
    assert registry.gpt_model_kwargs(spec, tp=2)["vocab_size"] == spec.padded_vocab_size(2)

    mapping = hf_mapping.MappingSpec.for_tp(spec, 2)
    names = hf_mapping.build_mappings(mapping, range(1))
    shapes = {m.megatron_name: m.shape for m in names}
    assert shapes["embedding.word_embeddings.weight"] == (151936, 2560)
    assert shapes["decoder.layers.0.self_attention.linear_qkv.weight"] == ((32 + 2 * 8) * 128, 2560)
    assert shapes["decoder.layers.0.self_attention.linear_proj.weight"] == (2560, 32 * 128)
    assert shapes["decoder.layers.0.self_attention.q_layernorm.weight"] == (128,)
    assert "output_layer.weight" not in shapes  # tied
    assert sum(torch.Size(m.shape).numel() for m in names if m.layer == 0) == spec.layer_params


def test_each_mapping_names_its_pipeline_stage():
    spec = hf_mapping.MappingSpec.for_tp(model_spec(tiny_hf_config("llama", num_hidden_layers=4)), 1)
    stages = {m.megatron_name: m.pp_stage(4, 2) for m in hf_mapping.build_mappings(spec)}
    assert stages["embedding.word_embeddings.weight"] == 0
    assert stages["decoder.layers.1.mlp.linear_fc2.weight"] == 0
    assert stages["decoder.layers.2.input_layernorm.weight"] == 1
    assert stages["decoder.final_layernorm.weight"] == 1
    assert [m.megatron_name for m in hf_mapping.stage_mappings(spec, 2, 1)][-1] == "output_layer.weight"
    tied = hf_mapping.MappingSpec.for_tp(model_spec(tiny_hf_config("qwen2", num_hidden_layers=4)), 1)
    last = hf_mapping.stage_mappings(tied, 2, 1)
    assert (last[-1].megatron_name, last[-1].hf_names) == ("output_layer.weight", ("model.embed_tokens.weight",))


def test_an_unsupported_config_json_is_a_config_error_naming_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**QWEN25_15B, "use_sliding_window": True}))
    with pytest.raises(ConfigError, match=r"config.json: Qwen2ForCausalLM: use_sliding_window=true"):
        resolve_shape(str(tmp_path), "qwen3-4b", "sizing.model_shape")
