"""A parsed model (`models/spec.ModelSpec`) -> megatron-core objects: `transformer_config(spec, ...)`,
`layer_spec(spec, backend)`, `gpt_model_kwargs(spec, tp=...)`, and the recompute fields of `parallel.recompute`."""

from __future__ import annotations

import importlib.util
from typing import Any, Literal

from fapo_megatron.models.spec import ModelSpec, UnsupportedModelError


def transformer_engine_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def transformer_config(
    spec: ModelSpec,
    *,
    tp: int = 1,
    pp: int = 1,
    dtype: str = "float32",
    sequence_parallel: bool = False,
    initialize_weights: bool = True,
    use_cpu_initialization: bool = False,
    recompute: Literal["none", "selective", "full"] = "none",
    recompute_num_layers: int = 1,
    **overrides,
):
    """megatron-core `TransformerConfig` for `spec` under the given parallel layout."""
    import torch
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    if spec.num_layers % pp != 0:
        raise ValueError(f"{spec.architecture}: {spec.num_layers} layers do not split over pp={pp}")
    if spec.num_query_groups % tp != 0:
        raise ValueError(f"{spec.architecture}: {spec.num_query_groups} KV heads do not split over tp={tp}")
    params_dtype = getattr(torch, dtype)
    kwargs = dict(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        ffn_hidden_size=spec.ffn_hidden_size,
        num_attention_heads=spec.num_attention_heads,
        num_query_groups=spec.num_query_groups,
        kv_channels=spec.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=spec.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=spec.qkv_bias,
        qk_layernorm=spec.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=spec.init_std,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sequence_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=dtype == "bfloat16",
        fp16=dtype == "float16",
        perform_initialization=initialize_weights,
        use_cpu_initialization=use_cpu_initialization,
        deallocate_pipeline_outputs=True,
        **recompute_settings(recompute, recompute_num_layers, spec.num_layers // pp),
    )
    kwargs.update(overrides)
    if "recompute_modules" not in TransformerConfig.__dataclass_fields__:  # megatron-core before 0.13
        kwargs.pop("recompute_modules", None)
    return TransformerConfig(**kwargs)


def recompute_settings(
    recompute: Literal["none", "selective", "full"], num_layers: int, layers_per_stage: int
) -> dict[str, Any]:
    """megatron-core's recompute fields for `parallel.recompute`: full = uniform chunks of `num_layers` layers
    (each chunk keeps only its input), selective = core attention recomputed, none = everything kept."""
    if recompute == "none":
        return dict(recompute_granularity=None, recompute_method=None, recompute_num_layers=None)
    if recompute == "selective":
        return dict(
            recompute_granularity="selective",
            recompute_method=None,
            recompute_num_layers=None,
            recompute_modules=["core_attn"],
        )
    if recompute != "full":
        raise ValueError(f"parallel.recompute={recompute!r}: choose none, selective or full")
    if not 1 <= num_layers <= layers_per_stage:
        raise ValueError(
            f"parallel.recompute_num_layers={num_layers} must be between 1 and the {layers_per_stage} layers "
            f"of a pipeline stage"
        )
    return dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=num_layers)


def resolve_backend(backend: Literal["auto", "local", "te"] = "auto") -> Literal["local", "te"]:
    """The layer spec `layer_spec(backend)` builds: auto is Transformer Engine's when it imports."""
    if backend == "auto":
        return "te" if transformer_engine_available() else "local"
    if backend not in ("local", "te"):
        raise ValueError(f"layer spec backend {backend!r}: choose auto, local or te")
    return backend


def parameter_renames(spec: ModelSpec, backend: Literal["auto", "local", "te"]) -> tuple[tuple[str, str], ...]:
    """Decoder-layer parameter renames from the local spec's names to `backend`'s: none for the local spec; for TE,
    megatron-core's own local-to-TE key map (the local spec's `sharded_state_dict_keys_map`, which is how local
    checkpoints load into TE models: input_layernorm. -> self_attention.linear_qkv.layer_norm_, ...)."""
    if resolve_backend(backend) == "local":
        return ()
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    local = get_gpt_layer_local_spec(qk_layernorm=spec.qk_layernorm, normalization="RMSNorm")
    return tuple(local.submodules.sharded_state_dict_keys_map.items())


def layer_spec(spec: ModelSpec, backend: Literal["auto", "local", "te"] = "auto"):
    """GPT decoder layer `ModuleSpec`: Transformer Engine's when it imports (or is asked for), else the local
    spec with core attention on torch SDPA."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    backend = resolve_backend(backend)
    if backend == "te":
        if not transformer_engine_available():
            raise UnsupportedModelError("layer spec backend 'te' asked for, but transformer_engine is not installed")
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=spec.qk_layernorm)
    from fapo_megatron.models.attention import SDPACoreAttention

    layer = get_gpt_layer_local_spec(qk_layernorm=spec.qk_layernorm, normalization="RMSNorm")
    layer.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    return layer


def gpt_model_kwargs(spec: ModelSpec, *, tp: int) -> dict[str, Any]:
    """Keyword arguments of megatron-core's GPTModel besides config, layer spec and pipeline stage flags."""
    kwargs: dict[str, Any] = dict(
        vocab_size=spec.padded_vocab_size(tp),
        max_sequence_length=spec.max_position_embeddings,
        share_embeddings_and_output_weights=spec.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=spec.rope.theta,
        parallel_output=True,
    )
    if spec.rope.scaling == "llama3":
        kwargs.update(rope_scaling=True, rope_scaling_factor=spec.rope.factor)
    elif spec.rope.scaling == "linear":
        kwargs.update(seq_len_interpolation_factor=spec.rope.factor)
    return kwargs
