"""The streaming checkpoint writer and reader (megatron/streaming_checkpoint.py) against megatron-core's own
dist_checkpointing.save of the same weights: same tensors, objects, shapes, dtypes and values; a checkpoint of
another shape is named on export."""

from pathlib import Path

import pytest
import torch
from convert_testlib import spawn, tiny_hf_model
from torch.distributed.checkpoint import FileSystemReader

from fapo_megatron.convert import hf_io, megatron_io, pipeline
from fapo_megatron.models import hf_mapping as hm
from fapo_megatron.models.spec import model_spec


def _layout(folder: Path) -> dict:
    """{key: (kind, global shape, dtype)} of every entry in a torch_dist checkpoint's DCP metadata."""
    entries = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    return {
        k: (type(v).__name__, tuple(getattr(v, "size", ())), getattr(getattr(v, "properties", None), "dtype", None))
        for k, v in entries.items()
    }


def _same_as_megatron_worker(rank, world_size, family, tied, tmp):
    tmp = Path(tmp)
    hf = tiny_hf_model(family, tied, seed=3)
    hf.to(torch.bfloat16).save_pretrained(str(tmp / "hf"))
    pipeline.hf_to_megatron(tmp / "hf", tmp / "streamed", tp=2, thresholds=None, progress=False)

    spec = pipeline.mapping_spec_for(hf_io.read_config(tmp / "hf"), tp=2, pp=1, divisible_by=128)
    reference = megatron_io.build_model(spec, dtype=torch.bfloat16)
    reference.load_state_dict(hm.rank_state_dict(hf_io.HFReader(tmp / "hf").get, spec), strict=False)
    megatron_io.save_checkpoint(reference, tmp / "megatron")
    assert _layout(tmp / "streamed") == _layout(tmp / "megatron")

    expected = {k: v for k, v in reference.state_dict().items() if isinstance(v, torch.Tensor)}
    for folder in ("streamed", "megatron"):
        model = megatron_io.build_model(spec, dtype=torch.bfloat16)
        megatron_io.load_checkpoint(model, tmp / folder)
        got = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
        assert set(got) == set(expected)
        for name, tensor in expected.items():
            assert got[name].dtype == torch.bfloat16 and torch.equal(got[name], tensor), (folder, name)
        streamed = dict(megatron_io.read_checkpoint(spec, tmp / folder, dtype=torch.bfloat16))
        assert {m.megatron_name for m in streamed} == set(expected)
        for mapping, tensor in streamed.items():
            assert torch.equal(tensor, expected[mapping.megatron_name]), (folder, mapping.megatron_name)

    wide_cfg = {**hf_io.read_config(tmp / "hf"), "hidden_size": 48}
    wide_spec = hm.MappingSpec(model_spec(wide_cfg), padded_vocab_size=spec.padded_vocab_size)
    with pytest.raises(
        ValueError,
        match=r"tensor 'embedding.word_embeddings.weight' .* is of shape \(256, 32\), "
        r"expected \(256, 48\)",
    ):
        next(megatron_io.read_checkpoint(wide_spec, tmp / "streamed", dtype=torch.bfloat16))


@pytest.mark.parametrize("family,tied", [("qwen2", False), ("qwen3", True)])
def test_streamed_checkpoint_equals_megatron_save(family, tied, tmp_path):
    spawn(_same_as_megatron_worker, 1, family, tied, str(tmp_path))
