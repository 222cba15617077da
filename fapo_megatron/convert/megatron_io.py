"""The megatron side of conversion: a single-process megatron-core GPTModel and its distributed checkpoint.

A megatron-core distributed checkpoint stores every tensor with its global shape, so one written by a single
TP=1/PP=1 process loads (resharded) under any TP/PP; only the padded vocabulary rows depend on the TP size the
checkpoint is meant for, and that is fixed when the model is built.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from fapo_megatron.megatron import model as mcore
from fapo_megatron.megatron import platform
from fapo_megatron.models import hf_mapping, registry

EMBEDDING_KEY = "embedding.word_embeddings.weight"
DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def init_single_process() -> None:
    """torch.distributed and megatron model parallel state for one process (TP=1, PP=1); idempotent."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    platform.setup("cuda" if torch.cuda.is_available() else "cpu")
    mcore.init_model_parallel(1, 1, seed=0)


def build_model(spec: hf_mapping.MappingSpec, *, dtype: torch.dtype, meta: bool = False):
    """An uninitialised TP=1/PP=1 GPTModel (local layer spec) of `spec.model` with `spec.padded_vocab_size` rows, all
    parameters in `dtype`, in eval mode; with `meta` its parameters have shapes but no storage (enough for the
    checkpoint layout of `sharded_state_dict()`)."""
    from megatron.core.models.gpt import GPTModel

    init_single_process()
    config = registry.transformer_config(
        spec.model, dtype=DTYPES[dtype], initialize_weights=False, use_cpu_initialization=True
    )
    kwargs = registry.gpt_model_kwargs(spec.model, tp=1)
    kwargs["vocab_size"] = spec.padded_vocab_size
    with torch.device("meta") if meta else contextlib.nullcontext():
        model = GPTModel(
            config=config,
            transformer_layer_spec=registry.layer_spec(spec.model, "local"),
            pre_process=True,
            post_process=True,
            **kwargs,
        )
    # Norm modules ignore params_dtype (training wraps them in Float16Module); one dtype keeps exports exact.
    return model.to(device=None if meta else platform.device(), dtype=dtype).eval()


def save_from_hf(
    spec: hf_mapping.MappingSpec,
    read_hf: Callable[[str], torch.Tensor],
    folder: str | Path,
    *,
    dtype: torch.dtype,
    on_tensor: Callable | None = None,
) -> None:
    """Write the distributed checkpoint of an HF model without holding the model: each megatron tensor is made
    from its HF tensors (read lazily) when the writer reaches it, so memory stays near two of the largest tensor.
    `read_hf` and `on_tensor` are called from one thread at a time, not always the caller's."""
    from fapo_megatron.megatron.streaming_checkpoint import save_lazily

    model = build_model(spec, dtype=dtype, meta=True)
    mappings = {m.megatron_name: m for m in hf_mapping.build_mappings(spec)}
    params = {name for name, _ in model.named_parameters()}
    if set(mappings) != params:
        unmapped, unknown = sorted(params - set(mappings)), sorted(set(mappings) - params)
        raise hf_mapping.MappingError(
            f"megatron model and mapping disagree: parameters without a mapping {unmapped[:4]}, "
            f"mapped names the model lacks {unknown[:4]}"
        )

    one_at_a_time = threading.Lock()  # the writer's two threads overlap reading one tensor with writing another

    def make(name: str) -> torch.Tensor:
        mapping = mappings[name]
        with one_at_a_time:
            full = hf_mapping.to_megatron(mapping, tuple(read_hf(n) for n in mapping.hf_names), spec)
            if on_tensor:
                on_tensor(mapping, full)
        return full

    save_lazily(model, folder, make, dtype)


def save_checkpoint(model, folder: str | Path) -> None:
    """Write an in-memory model's weights as a megatron-core distributed checkpoint (torch_dist format)."""
    from megatron.core import dist_checkpointing

    Path(folder).mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), str(folder))


def read_checkpoint(
    spec: hf_mapping.MappingSpec, folder: str | Path, *, dtype: torch.dtype
) -> Iterator[tuple[hf_mapping.TensorMapping, torch.Tensor]]:
    """(mapping, full megatron tensor) for every mapping in model order, loaded from a distributed checkpoint (any
    TP/PP it was saved at) one decoder layer at a time, so memory stays near one layer, not the model."""
    from fapo_megatron.megatron.streaming_checkpoint import entry_layouts, load_entries

    layouts = entry_layouts(build_model(spec, dtype=dtype, meta=True))
    for _, group in itertools.groupby(hf_mapping.build_mappings(spec), key=lambda m: m.layer):
        group = list(group)
        unknown = [m.megatron_name for m in group if m.megatron_name not in layouts]
        if unknown:
            raise hf_mapping.MappingError(f"megatron model has no parameter {unknown[0]!r}")
        loaded = load_entries(folder, {m.megatron_name: layouts[m.megatron_name] for m in group}, dtype)
        for mapping in group:
            yield mapping, loaded.pop(mapping.megatron_name)


def load_checkpoint(model, folder: str | Path) -> None:
    """Load weights from a megatron-core distributed checkpoint into `model` (any TP/PP it was saved at)."""
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load(model.sharded_state_dict(), str(folder))
    model.load_state_dict(state, strict=False)


def checkpoint_layout(folder: str | Path) -> tuple[int, torch.dtype]:
    """(padded vocab rows, storage dtype) of a distributed checkpoint, read from its metadata only."""
    from megatron.core import dist_checkpointing

    if not dist_checkpointing.check_is_distributed_checkpoint(str(folder)):
        raise FileNotFoundError(f"{folder}: not a megatron-core distributed checkpoint (no metadata.json)")
    metadata = dist_checkpointing.load_tensors_metadata(str(folder))
    if EMBEDDING_KEY not in metadata:
        raise KeyError(f"{folder}: checkpoint has no {EMBEDDING_KEY!r}")
    embedding = metadata[EMBEDDING_KEY]
    return embedding.global_shape[0], embedding.dtype
