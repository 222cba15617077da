"""Supported HF architectures -> megatron-core GPT model description.

`model_spec(hf_config)` reads an HF `config.json` dict into a `ModelSpec` (plain data, no megatron import);
`transformer_config(spec, ...)` and `layer_spec(spec, backend)` turn it into megatron-core objects.
Each supported `architectures[0]` has one entry in `FAMILIES`; anything the mapping cannot express exactly
(an unknown architecture, sliding windows, MLP biases, an unknown RoPE scaling type) raises
`UnsupportedModelError` naming the architecture and the option.
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


class UnsupportedModelError(ValueError):
    """The HF config names an architecture or option this project cannot map onto megatron-core."""


@dataclass(frozen=True, kw_only=True)
class RopeSpec:
    theta: float
    """RoPE base frequency (`rope_theta`)."""
    scaling: Literal["none", "llama3", "linear"] = "none"
    """HF `rope_scaling.rope_type` (megatron-core supports llama3 with its default band, and linear)."""
    factor: float = 1.0
    """Scaling factor of `scaling`."""


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """Everything megatron-core needs to build the GPT model of one HF checkpoint."""

    architecture: str
    family: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    norm_eps: float
    rope: RopeSpec
    tie_embeddings: bool
    qkv_bias: bool = False
    qk_layernorm: bool = False
    init_std: float = 0.02
    extra: dict[str, Any] = field(default_factory=dict)
    """Unused HF keys kept for diagnostics."""

    def padded_vocab_size(self, tp: int, divisible_by: int = 128) -> int:
        """Vocabulary rows of the embedding / output layer: a multiple of lcm(divisible_by, tp). Unlike megatron's
        `divisible_by * tp` this does not change with tp (any power of two up to 128), so checkpoints reshard."""
        multiple = math.lcm(divisible_by, tp)
        return -(-self.vocab_size // multiple) * multiple


# ------------------------------------------------------------------------------------------- HF parsing


def _get(cfg: dict, key: str, arch: str):
    if key not in cfg:
        raise UnsupportedModelError(f"{arch}: config.json lacks required key {key!r}")
    return cfg[key]


def _rope(cfg: dict, arch: str) -> RopeSpec:
    theta = float(cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)))
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters") or None
    if not scaling:
        return RopeSpec(theta=theta)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return RopeSpec(theta=theta)
    if kind == "linear":
        return RopeSpec(theta=theta, scaling="linear", factor=float(scaling["factor"]))
    if kind == "llama3":
        # megatron-core's llama3 scaling hard-codes this band; anything else would silently differ from HF.
        expected = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        for key, value in expected.items():
            if float(scaling.get(key, value)) != value:
                raise UnsupportedModelError(
                    f"{arch}: rope_scaling llama3 with {key}={scaling[key]} (megatron-core supports only {value})"
                )
        return RopeSpec(theta=theta, scaling="llama3", factor=float(scaling["factor"]))
    raise UnsupportedModelError(f"{arch}: rope_scaling type {kind!r} is not supported (supported: llama3, linear)")


def _common(cfg: dict, arch: str, family: str, **kwargs) -> ModelSpec:
    heads = _get(cfg, "num_attention_heads", arch)
    hidden = _get(cfg, "hidden_size", arch)
    if cfg.get("mlp_bias"):
        raise UnsupportedModelError(f"{arch}: mlp_bias=true is not supported")
    if cfg.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"{arch}: hidden_act={cfg['hidden_act']!r} is not supported (only silu)")
    if cfg.get("use_sliding_window"):
        raise UnsupportedModelError(f"{arch}: use_sliding_window=true is not supported")
    head_dim = cfg.get("head_dim") or hidden // heads
    return ModelSpec(
        architecture=arch,
        family=family,
        num_layers=_get(cfg, "num_hidden_layers", arch),
        hidden_size=hidden,
        ffn_hidden_size=_get(cfg, "intermediate_size", arch),
        num_attention_heads=heads,
        num_query_groups=cfg.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        vocab_size=_get(cfg, "vocab_size", arch),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope=_rope(cfg, arch),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        init_std=float(cfg.get("initializer_range", 0.02)),
        **kwargs,
    )


def _llama(cfg: dict, arch: str) -> ModelSpec:
    if cfg.get("attention_bias"):
        raise UnsupportedModelError(f"{arch}: attention_bias=true (biases on q/k/v and o_proj) is not supported")
    return _common(cfg, arch, "llama")


def _qwen2(cfg: dict, arch: str) -> ModelSpec:
    return _common(cfg, arch, "qwen2", qkv_bias=True)


def _qwen3(cfg: dict, arch: str) -> ModelSpec:
    if cfg.get("attention_bias"):
        raise UnsupportedModelError(f"{arch}: attention_bias=true is not supported")
    return _common(cfg, arch, "qwen3", qk_layernorm=True)


FAMILIES: dict[str, Callable[[dict, str], ModelSpec]] = {
    "LlamaForCausalLM": _llama,
    "Qwen2ForCausalLM": _qwen2,
    "Qwen3ForCausalLM": _qwen3,
}
"""HF `architectures[0]` -> parser. SmolLM2 and Qwen2.5 publish as LlamaForCausalLM / Qwen2ForCausalLM."""


def model_spec(hf_config: dict | str | Path) -> ModelSpec:
    """Parse an HF config (dict, config.json path or checkpoint folder) into a `ModelSpec`."""
    if not isinstance(hf_config, dict):
        path = Path(hf_config)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"HF config not found: {path}")
        hf_config = json.loads(path.read_text())
    archs = hf_config.get("architectures") or []
    if not archs:
        raise UnsupportedModelError("config.json has no 'architectures' entry")
    arch = archs[0]
    if arch not in FAMILIES:
        raise UnsupportedModelError(f"architecture {arch!r} is not supported (supported: {', '.join(FAMILIES)})")
    return FAMILIES[arch](hf_config, arch)


def tiny_hf_config(family: str, **overrides) -> dict:
    """A small random-weight HF config of `family` (llama, qwen2, qwen3) for tests, benchmarks and demos."""
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
    if family not in arch:
        raise UnsupportedModelError(f"tiny model family {family!r}: choose one of {', '.join(arch)}")
    cfg = {
        "architectures": [arch[family]],
        "model_type": family,
        "vocab_size": 128,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": family != "qwen3",
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
    }
    cfg.update(overrides)
    return cfg


# ------------------------------------------------------------------------------------ megatron-core objects


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
