"""The actor starts from a `convert hf-to-megatron` output (weights only, written by one TP1 process) at TP2: its
log-probs equal the HF model's, optimizer/schedule/step start fresh, a training checkpoint it saves exports back
to HF exactly what the actor holds, and a checkpoint of another shape fails naming the first mismatched tensor.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from converted_ckpt_worker import VOCAB  # noqa: E402
from megatron_testlib import launch_ranks, make_batch, rank_logs, tiny_hf_model  # noqa: E402

WORKER = Path(__file__).parent / "converted_ckpt_worker.py"
REPO = Path(__file__).resolve().parents[2]


def _hf_model(seed: int, **overrides):
    return tiny_hf_model("qwen2", seed, **{"vocab_size": VOCAB, "tie_word_embeddings": False, **overrides})


def _launch(scenario: str, world: int, workdir: Path) -> None:
    codes = launch_ranks(WORKER, scenario, world, workdir)
    assert codes == [0] * world, f"{scenario} exit codes {codes}\n{rank_logs(workdir, scenario, world)}"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("converted")
    _hf_model(1).save_pretrained(root / "hf")
    _hf_model(2, hidden_size=96).save_pretrained(root / "hf_wide")
    _launch("convert", 1, root)
    _launch("load", 2, root)
    return root


def _out(workdir: Path, name: str):
    return torch.load(workdir / "out" / f"{name}.pt", weights_only=False)


def test_converted_checkpoint_gives_hf_logprobs_at_tp2(workdir):
    batch = make_batch(vocab=VOCAB)
    model = transformers.AutoModelForCausalLM.from_pretrained(workdir / "hf").float().eval()
    with torch.no_grad():
        logits = model(batch.tokens).logits.float()
    picked = torch.log_softmax(logits, -1)[:, :-1].gather(-1, batch.tokens[:, 1:, None])[..., 0]
    valid = batch.attention_mask.clone()
    valid[:, 0] = False
    reference = torch.nn.functional.pad(picked, (1, 0)) * valid
    got = _out(workdir, "logprobs")
    assert reference.abs().sum() > 0
    diff = (got - reference).abs().max().item()
    assert diff <= 1e-4, f"max |actor log-prob - HF| = {diff}"


def test_weights_only_load_starts_optimizer_fresh_and_says_so(workdir):
    fresh = _out(workdir, "fresh")
    assert fresh == {"optimizer_steps": 0, "optimizer_states": 0, "lr": pytest.approx(1e-3)}
    log = (workdir / "load_rank0.log").read_text()
    assert "weights-only checkpoint" in log and "optimizer state, LR schedule, RNG and step start fresh" in log


def test_training_checkpoint_root_exports_to_hf(workdir):
    """`convert megatron-to-hf` on the actor's checkpoint root (`latest`) gives exactly the actor's weights."""
    out = workdir / "exported"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fapo_megatron",
            "convert",
            "megatron-to-hf",
            "--ckpt",
            str(workdir / "train_ckpt"),
            "--out",
            str(out),
            "--hf-config-from",
            str(workdir / "hf"),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    exported = {}
    for shard in out.glob("*.safetensors"):
        exported.update(load_file(shard))
    trained = _out(workdir, "trained")
    source = load_file(workdir / "hf" / "model.safetensors")
    assert set(exported) == set(trained) == set(source)
    for name, tensor in trained.items():
        assert torch.equal(exported[name], tensor), name
    assert any(not torch.equal(source[name], tensor) for name, tensor in trained.items()), "training changed nothing"


def test_checkpoint_of_another_shape_names_first_mismatched_tensor(workdir):
    message = _out(workdir, "mismatch_shape")
    assert "embedding.word_embeddings.weight" in message and "(256, 96)" in message and "(256, 64)" in message
    message = _out(workdir, "mismatch_vocab")
    assert "embedding.word_embeddings.weight" in message and "(192, 64)" in message
    assert "vocabulary padding differs" in message and "vocab_size=150 to 256 rows" in message
