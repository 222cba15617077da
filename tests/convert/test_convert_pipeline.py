"""hf-to-megatron / megatron-to-hf on tiny random models: bitwise round trips, the parity gate (passing, and
catching a corrupted mapping by layer), checkpoints that load under the target TP/PP, and named input errors.

Megatron runs in spawned processes (the CPU platform layer patches torch.cuda for the whole process)."""

import json
from pathlib import Path

import pytest
import torch
from convert_testlib import build_megatron_gpt, mapping_spec, spawn, tiny_hf_model

from fapo_megatron.convert import hf_io, pipeline
from fapo_megatron.models import hf_mapping as hm
from fapo_megatron.models.spec import UnsupportedModelError

# (family, tied) -> (tp, pp): every family tied and untied, every layout twice. The layout changes the vocab
# padding (tp) and what is validated (pp); test_checkpoint_loads_under_target_layout loads TP2 and PP2 for real.
CASES = {
    "llama": {False: (1, 1), True: (2, 1)},
    "qwen2": {False: (2, 1), True: (1, 2)},
    "qwen3": {False: (1, 2), True: (1, 1)},
}


def _save_tiny(folder: Path, family: str, tied: bool, **kw) -> Path:
    tiny_hf_model(family, tied, **kw).save_pretrained(str(folder))
    return folder


def _round_trip_worker(rank, world_size, family, tmp):
    for tied, (tp, pp) in CASES[family].items():
        hf_dir = _save_tiny(Path(tmp) / f"hf-{tied}", family, tied)
        mcore_dir = Path(tmp) / f"mcore-{tied}"
        result = pipeline.hf_to_megatron(hf_dir, mcore_dir, tp=tp, pp=pp, progress=False)
        assert result.parity.passed and result.parity.max_abs_diff < 1e-4, result.parity.table()
        meta = json.loads((mcore_dir / "meta.json").read_text())
        assert meta["weights_only"] and meta["layout"] == {"tp": tp, "pp": pp, "dp": 1, "distributed_optimizer": False}
        assert pipeline.verify_roundtrip(hf_dir, mcore_dir) == [], (family, tied, tp, pp)
        back = pipeline.megatron_to_hf(mcore_dir, Path(tmp) / f"back-{tied}", progress=False)
        assert back.parity.passed
        names = set(json.loads((back.out_dir / hf_io.INDEX_NAME).read_text())["weight_map"])
        assert ("lm_head.weight" in names) == (not tied)
        assert (back.out_dir / "generation_config.json").is_file()


@pytest.mark.parametrize("family", sorted(CASES))
def test_tiny_round_trip_bitwise_and_parity(family, tmp_path):
    spawn(_round_trip_worker, 1, family, str(tmp_path))


def _target_layout_worker(rank, world_size, family, tied, tp, pp, tmp):
    """Load the converted checkpoint under the layout it was made for; each rank must get exactly its slices."""
    from megatron.core import dist_checkpointing

    hf = tiny_hf_model(family, tied)
    spec = mapping_spec(hf.config, tp=tp)
    model = build_megatron_gpt(spec, tp=tp, pp=pp)
    state = dist_checkpointing.load(model.sharded_state_dict(), str(Path(tmp) / "mcore"))
    model.load_state_dict(state, strict=False)
    stage, tp_rank = (rank, 0) if pp > 1 else (0, rank)
    expected = hm.rank_state_dict(hf.state_dict(), spec, tp=tp, tp_rank=tp_rank, pp=pp, pp_stage=stage)
    got = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    assert set(got) == set(expected), set(got) ^ set(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


def _convert_worker(rank, world_size, family, tied, tp, pp, tmp):
    hf_dir = _save_tiny(Path(tmp) / "hf", family, tied)
    pipeline.hf_to_megatron(hf_dir, Path(tmp) / "mcore", tp=tp, pp=pp, progress=False)


@pytest.mark.parametrize("family,tied,tp,pp", [("qwen2", False, 2, 1), ("qwen3", True, 1, 2)])
def test_checkpoint_loads_under_target_layout(family, tied, tp, pp, tmp_path):
    spawn(_convert_worker, 1, family, tied, tp, pp, str(tmp_path))
    spawn(_target_layout_worker, tp * pp, family, tied, tp, pp, str(tmp_path))


def _corrupt_worker(rank, world_size, tmp):
    """Swap the first q head and the k head of every KV group in decoder layer 2 only."""
    original = hm.to_megatron

    def corrupted(mapping, hf_tensors, spec):
        full = original(mapping, hf_tensors, spec)
        if mapping.layer == 2 and mapping.megatron_name.endswith("linear_qkv.weight"):
            per_group = (spec.model.num_attention_heads // spec.model.num_query_groups + 2) * spec.model.head_dim
            grouped = full.view(spec.model.num_query_groups, per_group, -1).clone()
            q_rows, k_rows = (
                slice(0, spec.model.head_dim),
                slice(per_group - 2 * spec.model.head_dim, per_group - spec.model.head_dim),
            )
            grouped[:, q_rows], grouped[:, k_rows] = grouped[:, k_rows].clone(), grouped[:, q_rows].clone()
            full = grouped.view_as(full)
        return full

    hm.to_megatron = corrupted
    hf_dir = _save_tiny(Path(tmp) / "hf", "llama", False)
    with pytest.raises(pipeline.ParityError) as err:
        pipeline.hf_to_megatron(hf_dir, Path(tmp) / "mcore", progress=False)
    report = err.value.report
    assert report.first_diverging_layer() == 2, report.layer_rel_diffs
    assert "first diverging layer: decoder layer 2" in str(err.value)
    assert report.layer_rel_diffs[0] < 1e-5 and report.layer_rel_diffs[1] < 1e-5


def test_parity_gate_names_layer_of_corrupted_mapping(tmp_path):
    spawn(_corrupt_worker, 1, str(tmp_path))


def _errors_worker(rank, world_size, tmp):
    tmp = Path(tmp)
    model = tiny_hf_model("qwen2", False)
    model.save_pretrained(str(tmp / "sharded"), max_shard_size="40KB")
    index = json.loads((tmp / "sharded" / hf_io.INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))

    (tmp / "sharded" / shards[-1]).rename(tmp / "moved.safetensors")
    with pytest.raises(hf_io.CheckpointError, match=f"names shard file '{shards[-1]}', which is missing"):
        pipeline.hf_to_megatron(tmp / "sharded", tmp / "out1", progress=False)
    (tmp / "moved.safetensors").rename(tmp / "sharded" / shards[-1])

    wrong_shard = next(s for s in shards if s != index["weight_map"]["model.layers.1.mlp.up_proj.weight"])
    index["weight_map"]["model.layers.1.mlp.up_proj.weight"] = wrong_shard
    (tmp / "sharded" / hf_io.INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(hf_io.CheckpointError, match=f"{wrong_shard}: the index places tensor 'model.layers.1.mlp.up_"):
        pipeline.hf_to_megatron(tmp / "sharded", tmp / "out2", progress=False)

    _save_tiny(tmp / "hf", "qwen3", True)
    config = json.loads((tmp / "hf" / "config.json").read_text())
    (tmp / "hf" / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    with pytest.raises(hm.MappingError, match=r"gate_proj.weight: shape \(64, 32\) does not match the config's"):
        pipeline.hf_to_megatron(tmp / "hf", tmp / "out3", progress=False)
    (tmp / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(hm.MappingError, match="tensor-parallel size 3 does not divide num_attention_heads=4"):
        pipeline.hf_to_megatron(tmp / "hf", tmp / "out4", tp=3, progress=False)
    (tmp / "hf" / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UnsupportedModelError, match="architecture 'GPT2LMHeadModel' is not supported"):
        pipeline.hf_to_megatron(tmp / "hf", tmp / "out5", progress=False)


def test_bad_inputs_fail_naming_the_thing(tmp_path):
    spawn(_errors_worker, 1, str(tmp_path))
