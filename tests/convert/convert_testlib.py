"""Shared helpers for the conversion tests: tiny random HF models and a spawned gloo process group."""

from __future__ import annotations

import os
import socket

import torch
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
CONFIG_CLASSES = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}


def tiny_hf_config(family: str, tied: bool, **overrides):
    """4 layers, hidden 32, 4 query heads in 2 KV groups (GQA), head_dim 8, vocab 200 (pads to 256)."""
    kwargs = dict(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=64,
        vocab_size=200,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tied,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    kwargs.update(overrides)
    config = CONFIG_CLASSES[family](**kwargs)
    config.architectures = [ARCHITECTURES[family]]
    return config


def tiny_hf_model(family: str, tied: bool, seed: int = 0, **overrides):
    """A random tiny HF model; norms and biases are randomised too so a misplaced one changes the output."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_hf_config(family, tied, **overrides), dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param) if "norm" in name else 0.1 * torch.randn_like(param))
    return model.eval()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, fn, args):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    fn(rank, world_size, *args)


def spawn(fn, world_size: int, *args, attempts: int = 3) -> None:
    """Run fn(rank, world_size, *args) in `world_size` fresh processes with the torch.distributed env set.

    A free port can be taken by a parallel test between picking it and binding it: then try another one.
    """
    for attempt in range(attempts):
        try:
            mp.spawn(_entry, args=(world_size, free_port(), fn, args), nprocs=world_size, join=True)
            return
        except mp.ProcessRaisedException as err:
            if "EADDRINUSE" not in str(err) or attempt == attempts - 1:
                raise


def mapping_spec(hf_config, tp: int = 1, layer_renames=()):
    """The name map of an HF config (PretrainedConfig) for a model built at tensor parallel `tp`."""
    from fapo_megatron.models.hf_mapping import MappingSpec
    from fapo_megatron.models.spec import model_spec

    return MappingSpec.for_tp(model_spec(hf_config.to_dict()), tp, layer_renames)


def build_megatron_gpt(spec, tp: int = 1, pp: int = 1):
    """The actor's fp32 GPTModel (local spec) of `spec.model` for this rank of a tp x pp layout, on the CPU
    platform."""
    from fapo_megatron.megatron import model as mcore
    from fapo_megatron.megatron import platform
    from fapo_megatron.models import registry

    platform.setup("cpu")
    layout = mcore.init_model_parallel(tp, pp, seed=0)
    config = registry.transformer_config(spec.model, tp=tp, pp=pp, use_cpu_initialization=True)
    return mcore.build_gpt_model(spec.model, config, layout, backend="local").eval()
