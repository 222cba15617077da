"""HF <-> megatron mapping: hand-computed layouts, bitwise round trips, and logits of a megatron model loaded with
the mapped weights against the HF model itself."""

import pytest
import torch
from convert_testlib import build_megatron_gpt, mapping_spec, spawn, tiny_hf_config, tiny_hf_model

from fapo_megatron.models import hf_mapping as hm
from fapo_megatron.models.spec import model_spec

FAMILIES = ["llama", "qwen2", "qwen3"]


def _spec(family="llama", tied=False, layer_renames=()):
    return mapping_spec(tiny_hf_config(family, tied), layer_renames=layer_renames)


def test_merge_qkv_matches_megatron_group_layout_by_hand():
    shape = dict(num_hidden_layers=1, hidden_size=1, num_attention_heads=4, num_key_value_heads=2, head_dim=1)
    model = model_spec({"architectures": ["LlamaForCausalLM"], "intermediate_size": 1, "vocab_size": 1, **shape})
    spec = hm.MappingSpec(model, padded_vocab_size=1)
    q, k, v = torch.tensor([[0.0], [1], [2], [3]]), torch.tensor([[10.0], [11]]), torch.tensor([[20.0], [21]])
    fused = hm.merge_qkv(q, k, v, spec)
    assert fused.flatten().tolist() == [0, 1, 10, 20, 2, 3, 11, 21]
    assert [t.flatten().tolist() for t in hm.split_qkv(fused, spec)] == [[0, 1, 2, 3], [10, 11], [20, 21]]
    bias = hm.merge_qkv(q.flatten(), k.flatten(), v.flatten(), spec)
    assert bias.tolist() == [0, 1, 10, 20, 2, 3, 11, 21]


def test_tp_slices_by_hand():
    fc1 = torch.arange(8.0)[:, None]  # gate rows 0-3, up rows 4-7
    assert hm.tp_slice("decoder.layers.0.mlp.linear_fc1.weight", fc1, 2, 1).flatten().tolist() == [2, 3, 6, 7]
    proj = torch.arange(8.0).reshape(2, 4)
    assert hm.tp_slice("decoder.layers.3.self_attention.linear_proj.weight", proj, 2, 0).tolist() == [[0, 1], [4, 5]]
    norm = torch.ones(4)
    assert hm.tp_slice("decoder.layers.0.input_layernorm.weight", norm, 2, 1) is norm
    layer = "decoder.layers.1."
    for name in (layer + "mlp.linear_fc1.weight", "output_layer.weight", layer + "mlp.linear_fc2.weight"):
        full = torch.randn(8, 8)
        assert torch.equal(hm.tp_gather(name, [hm.tp_slice(name, full, 4, r) for r in range(4)]), full)


def test_pp_layer_ownership():
    assert [hm.pp_layer_range(6, 3, s) for s in range(3)] == [range(0, 2), range(2, 4), range(4, 6)]
    assert hm.global_to_local_layer(5, 6, 3) == (2, 1)
    assert hm.local_to_global_layer(1, 0, 6, 3) == 2
    assert hm.localize_name("decoder.layers.5.mlp.linear_fc2.weight", 6, 3) == "decoder.layers.1.mlp.linear_fc2.weight"
    with pytest.raises(hm.MappingError, match="does not divide num_layers=6"):
        hm.pp_layer_range(6, 4, 0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tied", [False, True])
def test_hf_megatron_hf_round_trip_is_bitwise(family, tied):
    hf = tiny_hf_model(family, tied)
    hf_sd = hf.state_dict()
    spec = mapping_spec(hf.config, tp=2)
    megatron = dict(hm.hf_to_megatron(hf_sd, spec))
    assert megatron["embedding.word_embeddings.weight"].shape == (256, 32)
    assert ("output_layer.weight" in megatron) == (not tied)
    assert ("decoder.layers.0.self_attention.linear_qkv.bias" in megatron) == (family == "qwen2")
    assert ("decoder.layers.0.self_attention.q_layernorm.weight" in megatron) == (family == "qwen3")
    back = dict(hm.megatron_to_hf(megatron, spec))
    expected = set(hf_sd) - ({"lm_head.weight"} if tied else set())
    assert set(back) == expected
    for name in expected:
        assert back[name].dtype == hf_sd[name].dtype and torch.equal(back[name], hf_sd[name]), name


def _layouts_worker(rank, world_size, family):
    """Every parameter of a real local-spec GPTModel, and of its TE layout (named by megatron-core's own
    local-to-TE key map), maps to HF and back bit for bit."""
    from fapo_megatron.models import registry

    local_spec = _spec(family)
    local_params = dict(build_megatron_gpt(local_spec).named_parameters())
    local_names = set(local_params)
    assert {m.megatron_name: m.shape for m in hm.build_mappings(local_spec)} == {
        n: tuple(p.shape) for n, p in local_params.items()
    }
    te_renames = dict(registry.parameter_renames(local_spec.model, "te"))
    assert te_renames == {
        "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
        "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
    }

    def to_te(name):  # how megatron-core's sharded_state_dict renames a local layer key for the TE model
        prefix, _, rest = name.partition(".layers.")
        index, _, tail = rest.partition(".")
        for local, te in te_renames.items():
            if rest and tail.startswith(local):
                return f"{prefix}.layers.{index}.{te}{tail[len(local) :]}"
        return name

    te_spec = _spec(family, layer_renames=tuple(te_renames.items()))
    hf_sd = {k: v.clone() for k, v in tiny_hf_model(family, False).state_dict().items()}
    for spec, names in ((local_spec, local_names), (te_spec, {to_te(n) for n in local_names})):
        megatron = dict(hm.hf_to_megatron(hf_sd, spec))
        assert set(megatron) == names
        back = dict(hm.megatron_to_hf(megatron, spec))
        assert set(back) == set(hf_sd) and all(torch.equal(back[n], hf_sd[n]) for n in hf_sd)
    assert "decoder.layers.1.mlp.linear_fc1.layer_norm_weight" in {m.megatron_name for m in hm.build_mappings(te_spec)}


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_every_parameter_maps_to_hf_and_back_in_local_and_te_layouts(family):
    spawn(_layouts_worker, 1, family)


def test_clear_errors():
    with pytest.raises(hm.MappingError, match="tensor-parallel size 4 does not divide num_key_value_heads=2"):
        _spec().check_tp(4)
    spec = _spec()
    bad = dict(tiny_hf_model("llama", False).state_dict())
    bad["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(8, 32)
    with pytest.raises(hm.MappingError, match=r"k_proj: shape \(8, 32\) does not match the config's \(16, 32\)"):
        dict(hm.hf_to_megatron(bad, spec))


def _logits_worker(rank, world_size, family, tied, tp):
    hf = tiny_hf_model(family, tied)
    spec = mapping_spec(hf.config, tp=tp)
    model = build_megatron_gpt(spec, tp=tp)
    state = hm.rank_state_dict(hf.state_dict(), spec, tp=tp, tp_rank=rank)
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    assert all(k.endswith("_extra_state") for k in result.missing_keys), result.missing_keys
    ids = torch.randint(0, spec.model.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        out = model(ids, torch.arange(12).expand(2, 12), attention_mask=None)
    rows = spec.padded_vocab_size // tp
    ref = torch.nn.functional.pad(ref, (0, spec.padded_vocab_size - spec.model.vocab_size))
    ref = ref[..., rank * rows : (rank + 1) * rows]
    diff = (out - ref).abs().max().item()
    assert diff <= 1e-4, f"{family} tied={tied} tp={tp} rank {rank}: max |logit diff| {diff}"


@pytest.mark.parametrize(
    "family,tied,tp",
    [("llama", False, 1), ("qwen2", True, 1), ("qwen3", False, 1), ("qwen2", False, 2), ("qwen3", True, 2)],
)
def test_megatron_model_with_mapped_weights_matches_hf_logits(family, tied, tp):
    spawn(_logits_worker, tp, family, tied, tp)
