"""The one parser of an HF `config.json`: `model_spec(hf_config)` -> `ModelSpec`, plain data, no megatron import.

Everything that needs a model's shape builds on it: the megatron-core objects (`models/registry.py`), the HF name
map (`models/hf_mapping.py`), memory sizing (`cluster/sizing.py`) and the cost model (`bench/`). Each supported
family has one entry in `FAMILIES`; anything the mapping cannot express exactly (an unknown architecture, sliding
windows, MLP biases, an o_proj bias, an unknown RoPE scaling type) raises `UnsupportedModelError` naming the
architecture and the option.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

VOCAB_DIVISIBLE_BY = 128
"""Default unit of the vocabulary padding (megatron's `make_vocab_size_divisible_by`)."""


class UnsupportedModelError(ValueError):
    """The HF config names an architecture or option this project cannot map onto megatron-core."""


@dataclass(frozen=True)
class Family:
    """What one HF model family has beyond the common Llama-style decoder (SwiGLU, RMSNorm, RoPE, GQA)."""

    name: str
    architecture: str
    """HF `architectures[0]`."""
    model_type: str
    """HF `model_type`, which picks the family of a config.json without `architectures`."""
    qkv_bias: bool
    """Biases on q/k/v (not on o_proj)."""
    qk_layernorm: bool
    """RMSNorm on each head's query and key."""


FAMILIES: dict[str, Family] = {
    f.architecture: f
    for f in (
        Family("llama", "LlamaForCausalLM", "llama", qkv_bias=False, qk_layernorm=False),
        Family("qwen2", "Qwen2ForCausalLM", "qwen2", qkv_bias=True, qk_layernorm=False),
        Family("qwen3", "Qwen3ForCausalLM", "qwen3", qkv_bias=False, qk_layernorm=True),
    )
}
"""HF `architectures[0]` -> family. SmolLM2 and Qwen2.5 publish as LlamaForCausalLM / Qwen2ForCausalLM."""


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
    """Everything megatron-core, the name map, sizing and the cost model need of one HF checkpoint."""

    name: str
    """What the spec was read from (a config.json path, a built-in shape's name), for messages."""
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

    def padded_vocab_size(self, tp: int, divisible_by: int = VOCAB_DIVISIBLE_BY) -> int:
        """Vocabulary rows of the embedding / output layer: a multiple of lcm(divisible_by, tp). Unlike megatron-lm's
        `divisible_by * tp` this does not change with tp (any power of two up to 128), so checkpoints reshard; the
        converter writes and the actor builds this many rows (megatron-core takes the count as given)."""
        multiple = math.lcm(divisible_by, tp)
        return -(-self.vocab_size // multiple) * multiple

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_query_groups * self.head_dim

    @property
    def layer_params(self) -> int:
        """Parameters of one decoder layer: q/k/v/o, q/k/v biases, per-head q/k norms, SwiGLU, two norms."""
        attention = self.hidden_size * (self.q_dim + 2 * self.kv_dim) + self.q_dim * self.hidden_size
        bias = self.q_dim + 2 * self.kv_dim if self.qkv_bias else 0
        qk_norm = 2 * self.head_dim if self.qk_layernorm else 0
        return attention + bias + qk_norm + 3 * self.hidden_size * self.ffn_hidden_size + 2 * self.hidden_size

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def num_params(self) -> int:
        """The HF checkpoint's parameter count (unpadded vocabulary; a tied output layer counted once)."""
        heads = 1 if self.tie_embeddings else 2
        return self.num_layers * self.layer_params + heads * self.embedding_params + self.hidden_size


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


def _family(cfg: dict) -> Family:
    archs = cfg.get("architectures") or []
    if archs:
        if archs[0] not in FAMILIES:
            raise UnsupportedModelError(
                f"architecture {archs[0]!r} is not supported (supported: {', '.join(FAMILIES)})"
            )
        return FAMILIES[archs[0]]
    by_type = {f.model_type: f for f in FAMILIES.values()}
    if cfg.get("model_type") not in by_type:
        raise UnsupportedModelError(
            f"config.json has no 'architectures' entry and model_type {cfg.get('model_type')!r} is not one of "
            f"{', '.join(by_type)}"
        )
    return by_type[cfg["model_type"]]


def model_spec(hf_config: dict | str | Path, name: str = "") -> ModelSpec:
    """Parse an HF config (dict, config.json path or checkpoint folder) into a `ModelSpec`; `name` labels it in
    messages (default: the config.json path, or the architecture)."""
    if not isinstance(hf_config, dict):
        path = Path(hf_config)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"HF config not found: {path}")
        hf_config = json.loads(path.read_text())
        name = name or str(path)
    cfg, family = hf_config, _family(hf_config)
    arch = family.architecture
    if cfg.get("mlp_bias"):
        raise UnsupportedModelError(f"{arch}: mlp_bias=true is not supported")
    if cfg.get("attention_bias") and not family.qkv_bias:
        raise UnsupportedModelError(f"{arch}: attention_bias=true (biases on q/k/v and o_proj) is not supported")
    if cfg.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"{arch}: hidden_act={cfg['hidden_act']!r} is not supported (only silu)")
    if cfg.get("use_sliding_window"):
        raise UnsupportedModelError(f"{arch}: use_sliding_window=true is not supported")
    heads = _get(cfg, "num_attention_heads", arch)
    hidden = _get(cfg, "hidden_size", arch)
    kv_heads = cfg.get("num_key_value_heads") or heads
    if heads % kv_heads:
        raise UnsupportedModelError(
            f"{arch}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}"
        )
    return ModelSpec(
        name=name or arch,
        architecture=arch,
        family=family.name,
        num_layers=_get(cfg, "num_hidden_layers", arch),
        hidden_size=hidden,
        ffn_hidden_size=_get(cfg, "intermediate_size", arch),
        num_attention_heads=heads,
        num_query_groups=kv_heads,
        head_dim=cfg.get("head_dim") or hidden // heads,
        vocab_size=_get(cfg, "vocab_size", arch),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope=_rope(cfg, arch),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=family.qkv_bias,
        qk_layernorm=family.qk_layernorm,
        init_std=float(cfg.get("initializer_range", 0.02)),
    )


def tiny_hf_config(family: str, **overrides) -> dict:
    """A small random-weight HF config of `family` (llama, qwen2, qwen3) for tests, benchmarks and demos."""
    arch = {f.name: f.architecture for f in FAMILIES.values()}
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
