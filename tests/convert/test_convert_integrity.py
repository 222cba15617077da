"""Conversion refuses damaged or non-finite models: flipped bytes in a saved .distcp file are caught by the
checksums recorded at save (naming the file) before an export reads them; an HF model with a NaN weight is refused
naming the tensor; the parity gate fails on non-finite logits of either side."""

from pathlib import Path

import pytest
import torch
from convert_testlib import spawn, tiny_hf_model

from fapo_megatron.convert import hf_io, parity, pipeline


def _integrity_worker(rank, world_size, tmp):
    tmp = Path(tmp)
    model = tiny_hf_model("llama", False)
    model.save_pretrained(str(tmp / "hf"))
    pipeline.hf_to_megatron(tmp / "hf", tmp / "mcore", progress=False)
    victim = max((tmp / "mcore").glob("*.distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = bytes(b ^ 0xFF for b in data[middle : middle + 4096])
    victim.write_bytes(bytes(data))
    with pytest.raises(hf_io.CheckpointError, match=f"{victim.name}: checksum differs"):
        pipeline.megatron_to_hf(tmp / "mcore", tmp / "back", progress=False)

    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    model.save_pretrained(str(tmp / "hf_nan"))
    with pytest.raises(hf_io.CheckpointError, match=r"'model.layers.1.mlp.up_proj.weight' has 1 non-finite"):
        pipeline.hf_to_megatron(tmp / "hf_nan", tmp / "mcore_nan", progress=False)


def test_damaged_or_non_finite_checkpoints_are_refused(tmp_path):
    spawn(_integrity_worker, 1, str(tmp_path))


class _Logits(torch.nn.Module):
    """A stand-in exposing what parity.compare reads: `model.layers` (none here) and logits of one prompt."""

    def __init__(self, logits: torch.Tensor, megatron: bool):
        super().__init__()
        self.logits, self.megatron = logits, megatron
        self.model = self
        self.layers = torch.nn.ModuleList()
        self.decoder = self
        self.config = type("C", (), {"vocab_size": logits.shape[-1]})
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, ids, positions=None, attention_mask=None):
        if self.megatron:
            return self.logits[None]
        return type("Out", (), {"logits": self.logits[None]})


@pytest.mark.parametrize("nan_side", ["HF", "megatron"])
def test_parity_gate_fails_on_non_finite_logits(nan_side):
    good = torch.randn(4, 8)
    bad = good.clone()
    bad[2, 3] = float("nan")
    hf, mc = (bad, good) if nan_side == "HF" else (good, bad)
    report = parity.compare(_Logits(hf, False), _Logits(mc, True), [[1, 2, 3, 4]], parity.ParityThresholds())
    assert not report.passed
    assert f"non-finite logits on the {nan_side} side" in report.failures
