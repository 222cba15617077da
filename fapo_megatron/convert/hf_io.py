"""Streaming reads and writes of HF safetensors checkpoints (single file or sharded with an index).

The reader opens shards lazily and returns one tensor at a time; the writer buffers at most one output shard.
Both report the bytes they move so the caller can show throughput.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Files besides weights that make a folder load with AutoModelForCausalLM / AutoTokenizer unchanged.
AUX_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


class CheckpointError(ValueError):
    """A checkpoint that is missing files or tensors, or disagrees with its config; the message names them."""


class HFReader:
    """Lazy tensor-by-tensor access to the safetensors weights of an HF checkpoint folder."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / INDEX_NAME
        if index.is_file():
            try:
                self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise CheckpointError(f"{index}: not a safetensors index with a 'weight_map' ({err})") from err
            for shard in sorted(set(self.weight_map.values())):
                if not (self.folder / shard).is_file():
                    raise CheckpointError(f"{index} names shard file {shard!r}, which is missing in {self.folder}")
        elif (self.folder / SINGLE_NAME).is_file():
            with safe_open(self.folder / SINGLE_NAME, "pt") as f:
                self.weight_map = {name: SINGLE_NAME for name in f.keys()}
        else:
            raise CheckpointError(f"{self.folder}: neither {INDEX_NAME} nor {SINGLE_NAME} found")
        self._open: dict[str, object] = {}
        self.bytes_read = 0

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def _handle(self, shard: str):
        if shard not in self._open:
            self._open[shard] = safe_open(self.folder / shard, "pt")
        return self._open[shard]

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise CheckpointError(f"{self.folder}: tensor {name!r} is not in the checkpoint")
        shard = self.weight_map[name]
        try:
            tensor = self._handle(shard).get_tensor(name)
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(f"{self.folder / shard}: cannot read tensor {name!r} ({err})") from err
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor

    def dtype(self) -> torch.dtype:
        """The dtype of the first floating-point tensor (the checkpoint's storage dtype)."""
        for name in self.weight_map:
            tensor = self.get(name)
            if tensor.is_floating_point():
                return tensor.dtype
        raise CheckpointError(f"{self.folder}: no floating-point tensors")

    def total_bytes(self) -> int:
        """Bytes of all tensors, from the shard headers (no tensor data is read)."""
        total = 0
        for name, shard in self.weight_map.items():
            try:
                piece = self._handle(shard).get_slice(name)
            except Exception as err:  # safetensors raises its own error types
                raise CheckpointError(
                    f"{self.folder / shard}: the index places tensor {name!r} here, but the file lacks it ({err})"
                ) from err
            total += _numel(piece.get_shape()) * _DTYPE_BYTES[piece.get_dtype()]
        return total


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _numel(shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


@dataclass
class HFWriter:
    """Writes tensors in arrival order into `model-0000i-of-0000n.safetensors` shards of at most `max_shard_bytes`,
    then `model.safetensors.index.json` on close()."""

    folder: Path
    max_shard_bytes: int = 2 * 1024**3
    on_bytes: Callable[[int], None] | None = None
    _buffer: dict[str, torch.Tensor] = field(default_factory=dict)
    _buffer_bytes: int = 0
    _shards: list[list[str]] = field(default_factory=list)
    _total_bytes: int = 0

    def __post_init__(self):
        self.folder = Path(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + size > self.max_shard_bytes:
            self._flush()
        self._buffer[name] = tensor.contiguous()
        self._buffer_bytes += size

    def _flush(self) -> None:
        if not self._buffer:
            return
        index = len(self._shards)
        save_file(self._buffer, str(self.folder / f"shard-{index}.tmp"), metadata={"format": "pt"})
        self._shards.append(list(self._buffer))
        self._total_bytes += self._buffer_bytes
        if self.on_bytes:
            self.on_bytes(self._buffer_bytes)
        self._buffer, self._buffer_bytes = {}, 0

    def close(self) -> None:
        """Flush, give shards their final `-of-N` names and write the index."""
        self._flush()
        count = len(self._shards)
        weight_map = {}
        for index, names in enumerate(self._shards):
            final = f"model-{index + 1:05d}-of-{count:05d}.safetensors"
            (self.folder / f"shard-{index}.tmp").rename(self.folder / final)
            weight_map.update({name: final for name in names})
        index_json = {"metadata": {"total_size": self._total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX_NAME).write_text(json.dumps(index_json, indent=2) + "\n")


def copy_aux_files(source: str | Path, dest: str | Path) -> list[str]:
    """Copy config, generation config and tokenizer files that exist in `source`; returns the names copied."""
    source, dest = Path(source), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in AUX_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, dest / name)
            copied.append(name)
    return copied


def read_config(folder: str | Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: config.json not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: invalid JSON at line {err.lineno} ({err.msg})") from err
