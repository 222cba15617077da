"""The hand-sized model both bench test files price: hidden 4, 2 layers, 2 heads of dim 2 (q_dim 4), 1 KV head
(kv_dim 2), ffn 8, vocab 10, untied: 388 parameters, 328 in matmuls."""

from fapo_megatron.models.spec import model_spec

TINY = model_spec(
    {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 4,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "intermediate_size": 8,
        "vocab_size": 10,
    },
    "hand",
)
