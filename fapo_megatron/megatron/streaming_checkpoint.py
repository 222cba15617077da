"""Write a megatron-core distributed checkpoint (torch_dist format) whose tensors are made one at a time, on demand.

`dist_checkpointing.save` with its default strategy needs every tensor in memory, and its writer keeps them all
until the save ends. Here the checkpoint layout comes from a model built on the meta device (its
`sharded_state_dict()`: keys, global shapes, layer offsets, ShardedObjects), and `make_tensor(name)` produces the
full tensor of one state-dict entry only when torch.distributed.checkpoint writes it. Files are written one per
entry (DCP `single_file_per_rank=False`): DCP's file writer holds every tensor of a file until the file is closed,
so this bounds memory by the largest tensor. megatron-core writes common.pt and metadata.json as usual, so the
result is an ordinary torch_dist checkpoint: `dist_checkpointing.load` reshards it to any TP/PP.

Single process, TP=1/PP=1 layouts only (each state-dict entry is then one whole tensor, or one layer of a
layer-stacked one).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType


def save_lazily(
    meta_model: torch.nn.Module, folder: str | Path, make_tensor: Callable[[str], torch.Tensor], dtype: torch.dtype
) -> None:
    """Save `meta_model`'s checkpoint layout into `folder`, filling the tensor of state-dict entry `name` with
    `make_tensor(name)` (shape of the model's parameter, cast to `dtype`) while it is being written."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    strategy = _LazyTorchDistStrategy(make_tensor, dtype)
    dist_checkpointing.save(meta_model.sharded_state_dict(), str(folder), sharded_strategy=strategy)


class _LazyTorchDistStrategy(SaveShardedStrategy):
    """torch_dist (version 1) as megatron-core's own strategy names it, so loads pick the usual reader."""

    def __init__(self, make_tensor: Callable[[str], torch.Tensor], dtype: torch.dtype):
        super().__init__("torch_dist", 1)
        self.make_tensor = make_tensor
        self.dtype = dtype

    @property
    def can_handle_sharded_objects(self) -> bool:
        return True

    def save(self, sharded_state_dict: dict, checkpoint_dir: Path) -> None:
        planner = _LazyPlanner()
        for name, value in sharded_state_dict.items():
            parts = list(nested_values(value)) if isinstance(value, (dict, list)) else [value]
            tensors = [p for p in parts if isinstance(p, ShardedTensor)]
            if tensors:
                planner.add_tensor(name, tensors, self.dtype, self.make_tensor)
            for obj in (p for p in parts if isinstance(p, ShardedObject)):
                planner.add_object(obj)
        writer = dcp.FileSystemWriter(str(checkpoint_dir), single_file_per_rank=False, thread_count=1)
        try:
            dcp.save({}, storage_writer=writer, planner=planner, no_dist=True)
        except CheckpointException:
            if planner.error is not None:  # the caller's own error (naming a tensor), not DCP's wrapper
                raise planner.error from None
            raise


class _LazyPlanner(DefaultSavePlanner):
    """A DCP save planner whose write items are given up front and whose data is made in `resolve_data`."""

    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.items: list[WriteItem] = []
        self.makers: dict[tuple, Callable[[], torch.Tensor | io.BytesIO]] = {}
        self.error: Exception | None = None
        """The first exception raised while making data (DCP re-raises it wrapped)."""

    def add_tensor(self, name: str, parts: list[ShardedTensor], dtype: torch.dtype, make_tensor: Callable) -> None:
        """One chunk for the whole tensor of state-dict entry `name` (the union of its megatron shards, e.g. the
        gate and up halves of a SwiGLU fc1): offsets = its layer offset, then zeros."""
        key, axes = parts[0].key, parts[0].prepend_axis_num
        local_shape = _union_shape(name, parts)
        offsets = tuple(parts[0].global_offset[:axes]) + (0,) * len(local_shape)
        sizes = (1,) * axes + local_shape

        def make() -> torch.Tensor:
            full = make_tensor(name)
            if tuple(full.shape) != local_shape:
                raise ValueError(f"{name}: made tensor of shape {tuple(full.shape)}, the model has {local_shape}")
            return full.to(dtype).reshape(sizes)

        index = MetadataIndex(key, offsets)
        properties = TensorProperties(dtype=dtype)
        chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
        data = TensorWriteData(chunk=chunk, properties=properties, size=torch.Size(parts[0].global_shape))
        self.items.append(WriteItem(index=index, type=WriteItemType.SHARD, tensor_data=data))
        self.makers[_item_id(index)] = make

    def add_object(self, obj: ShardedObject) -> None:
        """A ShardedObject as megatron's torch_dist strategy stores it: torch.save([data]) under its unique key."""
        index = MetadataIndex(obj.unique_key)

        def make() -> io.BytesIO:
            buffer = io.BytesIO()
            torch.save([obj.data], buffer)
            return buffer

        self.items.append(WriteItem(index=index, type=WriteItemType.BYTE_IO))
        self.makers[_item_id(index)] = make

    def create_local_plan(self) -> SavePlan:
        self.plan = SavePlan(self.items)
        return self.plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
        try:
            return self.makers[_item_id(write_item.index)]()
        except Exception as err:
            self.error = self.error or err
            raise


def _item_id(index: MetadataIndex) -> tuple:
    return index.fqn, tuple(index.offset) if index.offset is not None else None


def _union_shape(name: str, parts: list[ShardedTensor]) -> tuple[int, ...]:
    """Shape of the tensor the shards of one state-dict entry tile; raises when they do not tile a whole one."""
    axes = parts[0].prepend_axis_num
    keys = {p.key for p in parts}
    layer_offsets = {tuple(p.global_offset[:axes]) for p in parts}
    shape = tuple(parts[0].global_shape[axes:])
    covered = sum(p.data.numel() for p in parts)
    if len(keys) > 1 or len(layer_offsets) > 1 or covered != torch.Size(shape).numel():
        raise ValueError(f"{name}: its shards {sorted(keys)} do not tile one whole tensor of shape {shape}")
    return shape
