"""HF transformers <-> megatron-core GPTModel weight mapping: names, fused layouts, TP slices, PP layer ownership.

Pure functions over tensors; nothing here imports megatron.core, so the actor, the checkpoint converter and the
weight-sync exporter share one mapping. It is built from the parsed model (`models/spec.ModelSpec`: shapes and
which optional tensors the family has); each `TensorMapping` carries its full shape and the pipeline stage that
holds it. Every full megatron tensor below is the unsharded tensor of a TP=1/PP=1 model, named with global layer
indices.

Megatron layouts reproduced here:
* linear_qkv: rows grouped per KV group, [q heads of group g..., k_g, v_g] for g in groups (the view that
  `SelfAttention.get_query_key_value_tensors` splits), so a contiguous TP chunk holds whole groups.
* linear_fc1 (SwiGLU): cat(gate, up) on dim 0; a TP rank holds cat(gate_r, up_r), not a contiguous chunk.
* word embeddings / output layer: vocab padded with zero rows (`ModelSpec.padded_vocab_size`: lcm(128, tp)).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from fapo_megatron.models.spec import ModelSpec

TensorKind = Literal["copy", "qkv", "gate_up", "vocab"]
Owner = Literal["embedding", "layer", "head"]


class MappingError(ValueError):
    """A config or tensor that the mapping cannot convert; the message names the key or tensor."""


@dataclass(frozen=True)
class MappingSpec:
    """The parsed model and the naming choices that fix the mapping for it."""

    model: ModelSpec
    padded_vocab_size: int
    """Megatron rows of word_embeddings / output_layer; >= vocab_size, extra rows are zero. A new model takes
    `ModelSpec.padded_vocab_size(tp)` (`for_tp`), a checkpoint its own rows."""
    layer_renames: tuple[tuple[str, str], ...] = ()
    """(local prefix, built prefix) renames of decoder-layer parameter names for the layer spec actually built:
    empty for the local spec; for Transformer Engine's, megatron-core's own local-to-TE key map
    (`models.registry.parameter_renames`), whose norms are fused into linear_qkv / linear_fc1."""

    def __post_init__(self):
        if self.padded_vocab_size < self.model.vocab_size:
            raise MappingError(f"padded_vocab_size={self.padded_vocab_size} < vocab_size={self.model.vocab_size}")

    @classmethod
    def for_tp(cls, model: ModelSpec, tp: int, layer_renames: tuple[tuple[str, str], ...] = ()) -> MappingSpec:
        """The mapping of a model built for tensor parallel `tp` (the one vocabulary padding rule)."""
        return cls(model, model.padded_vocab_size(tp), layer_renames)

    def check_tp(self, tp: int) -> None:
        """Raise naming the quantity that tensor-parallel size `tp` does not divide."""
        for what, value in (
            ("num_attention_heads", self.model.num_attention_heads),
            ("num_key_value_heads", self.model.num_query_groups),
            ("intermediate_size", self.model.ffn_hidden_size),
            ("padded vocab size", self.padded_vocab_size),
        ):
            if value % tp:
                raise MappingError(f"tensor-parallel size {tp} does not divide {what}={value}")


@dataclass(frozen=True)
class TensorMapping:
    """One megatron tensor, the HF tensors it is made of, its full shape and the pipeline stage that holds it."""

    megatron_name: str
    hf_names: tuple[str, ...]
    kind: TensorKind
    layer: int | None
    """Global decoder layer index; None for embeddings, final norm and output layer."""
    shape: tuple[int, ...]
    """Full (TP=1) megatron shape, vocabulary rows padded."""
    owner: Owner
    """Who holds it: the embedding (first stage), a decoder layer, or the head (final norm, output layer: last
    stage)."""

    def pp_stage(self, num_layers: int, pp: int) -> int:
        """The pipeline stage (of `pp`) whose module holds this tensor."""
        if self.owner == "layer":
            return global_to_local_layer(self.layer, num_layers, pp)[0]
        return 0 if self.owner == "embedding" else pp - 1


def _layer_mappings(spec: MappingSpec, i: int) -> list[TensorMapping]:
    model = spec.model
    hidden, ffn, head = model.hidden_size, model.ffn_hidden_size, model.head_dim
    qkv_rows = model.q_dim + 2 * model.kv_dim
    m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
    qkv = tuple(f"{h}self_attn.{p}_proj" for p in "qkv")
    rows = [
        ("input_layernorm.weight", (f"{h}input_layernorm.weight",), "copy", (hidden,)),
        ("self_attention.linear_qkv.weight", tuple(f"{n}.weight" for n in qkv), "qkv", (qkv_rows, hidden)),
        ("self_attention.linear_proj.weight", (f"{h}self_attn.o_proj.weight",), "copy", (hidden, model.q_dim)),
        ("pre_mlp_layernorm.weight", (f"{h}post_attention_layernorm.weight",), "copy", (hidden,)),
        (
            "mlp.linear_fc1.weight",
            (f"{h}mlp.gate_proj.weight", f"{h}mlp.up_proj.weight"),
            "gate_up",
            (2 * ffn, hidden),
        ),
        ("mlp.linear_fc2.weight", (f"{h}mlp.down_proj.weight",), "copy", (hidden, ffn)),
    ]
    if model.qkv_bias:
        rows.append(("self_attention.linear_qkv.bias", tuple(f"{n}.bias" for n in qkv), "qkv", (qkv_rows,)))
    if model.qk_layernorm:
        rows.append(("self_attention.q_layernorm.weight", (f"{h}self_attn.q_norm.weight",), "copy", (head,)))
        rows.append(("self_attention.k_layernorm.weight", (f"{h}self_attn.k_norm.weight",), "copy", (head,)))
    return [
        TensorMapping(m + _rename(name, spec.layer_renames), hf, kind, i, shape, "layer")
        for name, hf, kind, shape in rows
    ]


def _rename(name: str, renames: tuple[tuple[str, str], ...]) -> str:
    for local, built in renames:
        if name.startswith(local):
            return built + name[len(local) :]
    return name


def _vocab(megatron_name: str, hf_name: str, spec: MappingSpec, owner: Owner) -> TensorMapping:
    shape = (spec.padded_vocab_size, spec.model.hidden_size)
    return TensorMapping(megatron_name, (hf_name,), "vocab", None, shape, owner)


def build_mappings(spec: MappingSpec, layers: range | None = None) -> list[TensorMapping]:
    """All mappings in model order: embedding, decoder layers (`layers`, default all), final norm, output layer."""
    layers = range(spec.model.num_layers) if layers is None else layers
    out = [_vocab("embedding.word_embeddings.weight", "model.embed_tokens.weight", spec, "embedding")]
    for i in layers:
        out.extend(_layer_mappings(spec, i))
    norm = ("model.norm.weight",)
    out.append(TensorMapping("decoder.final_layernorm.weight", norm, "copy", None, (spec.model.hidden_size,), "head"))
    if not spec.model.tie_embeddings:
        out.append(_vocab("output_layer.weight", "lm_head.weight", spec, "head"))
    return out


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: MappingSpec) -> torch.Tensor:
    """HF q/k/v projections (weights [out, hidden] or biases [out]) -> megatron per-group [q..., k, v] rows."""
    groups, per_group = spec.model.num_query_groups, spec.model.num_attention_heads // spec.model.num_query_groups
    tail = q.shape[1:]
    _check_shape("q_proj", q, (spec.model.num_attention_heads * spec.model.head_dim, *tail))
    _check_shape("k_proj", k, (groups * spec.model.head_dim, *tail))
    _check_shape("v_proj", v, (groups * spec.model.head_dim, *tail))
    fused = torch.cat(
        [
            q.reshape(groups, per_group * spec.model.head_dim, *tail),
            k.reshape(groups, spec.model.head_dim, *tail),
            v.reshape(groups, spec.model.head_dim, *tail),
        ],
        dim=1,
    )
    return fused.reshape(-1, *tail).contiguous()


def split_qkv(fused: torch.Tensor, spec: MappingSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of merge_qkv."""
    groups, per_group = spec.model.num_query_groups, spec.model.num_attention_heads // spec.model.num_query_groups
    tail = fused.shape[1:]
    _check_shape("linear_qkv", fused, ((per_group + 2) * groups * spec.model.head_dim, *tail))
    grouped = fused.reshape(groups, (per_group + 2) * spec.model.head_dim, *tail)
    q, k, v = torch.split(grouped, [per_group * spec.model.head_dim, spec.model.head_dim, spec.model.head_dim], dim=1)
    return tuple(t.reshape(-1, *tail).contiguous() for t in (q, k, v))


def _check_shape(name: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise MappingError(f"{name}: shape {tuple(tensor.shape)} does not match the config's {tuple(expected)}")


def _pad_vocab(tensor: torch.Tensor, spec: MappingSpec) -> torch.Tensor:
    extra = spec.padded_vocab_size - tensor.shape[0]
    if extra == 0:
        return tensor.contiguous()
    return torch.cat([tensor, tensor.new_zeros(extra, *tensor.shape[1:])]).contiguous()


def to_megatron(mapping: TensorMapping, hf_tensors: tuple[torch.Tensor, ...], spec: MappingSpec) -> torch.Tensor:
    """The full megatron tensor for `mapping` from its HF tensors (in mapping.hf_names order)."""
    if mapping.kind == "qkv":
        return merge_qkv(*hf_tensors, spec)
    if mapping.kind == "gate_up":
        gate, up = hf_tensors
        for name, t in zip(mapping.hf_names, hf_tensors):
            _check_shape(name, t, (spec.model.ffn_hidden_size, spec.model.hidden_size))
        return torch.cat([gate, up]).contiguous()
    (tensor,) = hf_tensors
    if mapping.kind == "vocab":
        _check_shape(mapping.hf_names[0], tensor, (spec.model.vocab_size, spec.model.hidden_size))
        return _pad_vocab(tensor, spec)
    _check_shape(mapping.hf_names[0], tensor, mapping.shape)
    return tensor.contiguous()


def to_hf(mapping: TensorMapping, tensor: torch.Tensor, spec: MappingSpec) -> tuple[torch.Tensor, ...]:
    """The HF tensors (in mapping.hf_names order) for one full megatron tensor."""
    _check_shape(mapping.megatron_name, tensor, mapping.shape)
    if mapping.kind == "qkv":
        return split_qkv(tensor, spec)
    if mapping.kind == "gate_up":
        return tuple(t.contiguous() for t in torch.chunk(tensor, 2))
    if mapping.kind == "vocab":
        return (tensor[: spec.model.vocab_size].contiguous(),)
    return (tensor.contiguous(),)


def hf_to_megatron(get_hf: Callable[[str], torch.Tensor] | Mapping[str, torch.Tensor], spec: MappingSpec):
    """Yield (megatron name, full tensor) for the whole model; `get_hf` reads one HF tensor by name (lazily)."""
    read = get_hf.__getitem__ if isinstance(get_hf, Mapping) else get_hf
    for mapping in build_mappings(spec):
        yield mapping.megatron_name, to_megatron(mapping, tuple(read(n) for n in mapping.hf_names), spec)


def megatron_to_hf(
    get_megatron: Callable[[str], torch.Tensor] | Mapping[str, torch.Tensor], spec: MappingSpec
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor) for the whole model; tied models yield no lm_head.weight."""
    read = get_megatron.__getitem__ if isinstance(get_megatron, Mapping) else get_megatron
    for mapping in build_mappings(spec):
        yield from zip(mapping.hf_names, to_hf(mapping, read(mapping.megatron_name), spec))


# ---- tensor parallel -------------------------------------------------------------------------------------------

_COLUMN_PARALLEL = ("linear_qkv.weight", "linear_qkv.bias", "linear_fc1.weight", "word_embeddings.weight")
_ROW_PARALLEL = ("linear_proj.weight", "linear_fc2.weight")


def tp_split_dim(megatron_name: str) -> int | None:
    """Dimension split across TP ranks: 0 column-parallel (qkv, fc1, vocab), 1 row-parallel, None replicated."""
    if megatron_name.endswith(_COLUMN_PARALLEL) or megatron_name == "output_layer.weight":
        return 0
    if megatron_name.endswith(_ROW_PARALLEL):
        return 1
    return None


def _is_gated_fc1(megatron_name: str) -> bool:
    return megatron_name.endswith("linear_fc1.weight")


def tp_slice(megatron_name: str, full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """TP rank `rank`'s part of a full megatron tensor (SwiGLU fc1: cat(gate_rank, up_rank))."""
    dim = tp_split_dim(megatron_name)
    if dim is None or tp == 1:
        return full
    if full.shape[dim] % (2 * tp if _is_gated_fc1(megatron_name) else tp):
        raise MappingError(f"{megatron_name}: dim {dim} of size {full.shape[dim]} does not split across tp={tp}")
    if _is_gated_fc1(megatron_name):
        gate, up = torch.chunk(full, 2, dim=dim)
        return torch.cat([torch.chunk(gate, tp, dim)[rank], torch.chunk(up, tp, dim)[rank]], dim).contiguous()
    return torch.chunk(full, tp, dim=dim)[rank].contiguous()


def tp_gather(megatron_name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of tp_slice over all ranks' shards (in rank order); replicated tensors return shard 0."""
    dim = tp_split_dim(megatron_name)
    if dim is None or len(shards) == 1:
        return shards[0]
    if _is_gated_fc1(megatron_name):
        halves = [torch.chunk(s, 2, dim=dim) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim)
    return torch.cat(shards, dim)


# ---- pipeline parallel -----------------------------------------------------------------------------------------


def pp_layer_range(num_layers: int, pp: int, stage: int) -> range:
    """Global indices of the decoder layers held by pipeline stage `stage` (even split, as megatron-core does)."""
    if num_layers % pp:
        raise MappingError(f"pipeline-parallel size {pp} does not divide num_layers={num_layers}")
    per_stage = num_layers // pp
    return range(stage * per_stage, (stage + 1) * per_stage)


def global_to_local_layer(layer: int, num_layers: int, pp: int) -> tuple[int, int]:
    """(stage, local index) of global decoder layer `layer`."""
    per_stage = pp_layer_range(num_layers, pp, 0).stop
    return divmod(layer, per_stage)


def local_to_global_layer(stage: int, local: int, num_layers: int, pp: int) -> int:
    return pp_layer_range(num_layers, pp, stage)[local]


def stage_mappings(spec: MappingSpec, pp: int, stage: int) -> list[TensorMapping]:
    """Mappings owned by one pipeline stage: its layers, embedding on the first, final norm/output on the last.

    With tied embeddings and pp > 1 the last stage also holds output_layer.weight, a copy of the embedding."""
    ranged = build_mappings(spec, pp_layer_range(spec.model.num_layers, pp, stage))
    out = [m for m in ranged if m.pp_stage(spec.model.num_layers, pp) == stage]
    if stage == pp - 1 and spec.model.tie_embeddings and pp > 1:
        out.append(_vocab("output_layer.weight", "model.embed_tokens.weight", spec, "head"))
    return out


def localize_name(megatron_name: str, num_layers: int, pp: int) -> str:
    """Rename `decoder.layers.<global>.` to the stage-local index used by that stage's module state dict."""
    prefix = "decoder.layers."
    if not megatron_name.startswith(prefix):
        return megatron_name
    index, rest = megatron_name[len(prefix) :].split(".", 1)
    return f"{prefix}{global_to_local_layer(int(index), num_layers, pp)[1]}.{rest}"


def rank_state_dict(
    get_hf: Callable[[str], torch.Tensor] | Mapping[str, torch.Tensor],
    spec: MappingSpec,
    *,
    tp: int = 1,
    tp_rank: int = 0,
    pp: int = 1,
    pp_stage: int = 0,
) -> dict[str, torch.Tensor]:
    """What one model-parallel rank's GPTModel loads: stage-local names, its TP slices (load_state_dict strict=False:
    megatron's `_extra_state` entries are not weights)."""
    spec.check_tp(tp)
    read = get_hf.__getitem__ if isinstance(get_hf, Mapping) else get_hf
    out = {}
    for mapping in stage_mappings(spec, pp, pp_stage):
        full = to_megatron(mapping, tuple(read(n) for n in mapping.hf_names), spec)
        out[localize_name(mapping.megatron_name, spec.model.num_layers, pp)] = tp_slice(
            mapping.megatron_name, full, tp, tp_rank
        )
    return out
