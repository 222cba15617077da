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
from safetensors.torch import save_file

from fapo_megatron.megatron.checkpoint_files import CheckpointError

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


class HFReader:
    """Tensor-by-tensor reads of the safetensors weights of an HF checkpoint folder.

    Reads go through plain file reads into fresh tensors (not mmap): memory-mapped shards would stay resident and
    count toward the process's memory for the whole conversion."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._headers: dict[str, dict] = {}
        self.bytes_read = 0
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
            self.weight_map = {name: SINGLE_NAME for name in self._header(SINGLE_NAME)}
        else:
            raise CheckpointError(f"{self.folder}: neither {INDEX_NAME} nor {SINGLE_NAME} found")

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def _header(self, shard: str) -> dict:
        """{tensor name: (dtype, shape, absolute start, end)} from a safetensors file header."""
        headers = self._headers
        if shard not in headers:
            path = self.folder / shard
            with open(path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                try:
                    raw = json.loads(f.read(size))
                except (json.JSONDecodeError, UnicodeDecodeError) as err:
                    raise CheckpointError(f"{path}: not a safetensors file (bad header: {err})") from err
            headers[shard] = {
                name: (
                    entry["dtype"],
                    tuple(entry["shape"]),
                    8 + size + entry["data_offsets"][0],
                    8 + size + entry["data_offsets"][1],
                )
                for name, entry in raw.items()
                if name != "__metadata__"
            }
        return headers[shard]

    def _entry(self, name: str) -> tuple:
        if name not in self.weight_map:
            raise CheckpointError(f"{self.folder}: tensor {name!r} is not in the checkpoint")
        shard = self.weight_map[name]
        entry = self._header(shard).get(name)
        if entry is None:
            raise CheckpointError(
                f"{self.folder / shard}: the index places tensor {name!r} here, but the file lacks it"
            )
        if entry[0] not in _DTYPES:
            raise CheckpointError(f"{self.folder / shard}: tensor {name!r} has unsupported dtype {entry[0]}")
        return entry

    def get(self, name: str) -> torch.Tensor:
        dtype, shape, start, end = self._entry(name)
        tensor = torch.empty(shape, dtype=_DTYPES[dtype])
        buffer = memoryview(tensor.view(-1).view(torch.uint8).numpy()) if tensor.numel() else memoryview(b"")
        if len(buffer) != end - start:
            raise CheckpointError(f"{self.folder / self.weight_map[name]}: tensor {name!r} has a corrupt extent")
        with open(self.folder / self.weight_map[name], "rb", buffering=0) as f:
            f.seek(start)
            if f.readinto(buffer) != end - start:
                raise CheckpointError(f"{self.folder / self.weight_map[name]}: tensor {name!r} is truncated")
        self.bytes_read += end - start
        return tensor

    def dtype(self) -> torch.dtype:
        """The dtype of the first floating-point tensor (the checkpoint's storage dtype)."""
        for name in self.weight_map:
            dtype = _DTYPES[self._entry(name)[0]]
            if dtype.is_floating_point:
                return dtype
        raise CheckpointError(f"{self.folder}: no floating-point tensors")

    def total_bytes(self) -> int:
        """Bytes of all tensors, from the shard headers (checks that every indexed tensor exists)."""
        return sum(end - start for _, _, start, end in (self._entry(name) for name in self.weight_map))


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


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
