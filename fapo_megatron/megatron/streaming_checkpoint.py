"""Stream a megatron-core distributed checkpoint (torch_dist format) tensor by tensor, in either direction.

`dist_checkpointing.save/load` need every tensor of the model in memory at once (and the default save writer keeps
them all until it ends). Here the checkpoint layout comes from a model built on the meta device: for each state-dict
entry of its `sharded_state_dict()`, the checkpoint key, its layer offset (decoder layers are stacked on a prepended
axis) and its shape (`EntryLayout`).
* save: `make_tensor(name)` produces one entry's tensor when torch.distributed.checkpoint (DCP) writes it; one file
  per entry (DCP `single_file_per_rank=False`), because DCP's file writer holds every tensor of a file until the file
  is closed; two writer threads overlap making one tensor with writing (and fsyncing) another. megatron-core writes
  common.pt and metadata.json as usual, so the result is an ordinary torch_dist checkpoint: `dist_checkpointing.load`
  reshards it to any TP/PP.
* load: the entries asked for, read with DCP's resharding from a checkpoint saved at any TP/PP (megatron-core's
  own load cannot read part of a layer-stacked tensor in a single process).
Single process, TP=1/PP=1 layouts only: each state-dict entry is then one whole tensor, or one layer of a stacked one.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, apply_factories
from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import LoadPlan, SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list


@dataclass(frozen=True)
class EntryLayout:
    """Where one state-dict entry's tensor lives in the checkpoint."""

    key: str
    """Checkpoint tensor key (layer-stacked keys have no layer number)."""
    offsets: tuple[int, ...]
    """Offset of the entry's chunk in the global tensor: its layer index on the prepended axes, then zeros."""
    shape: tuple[int, ...]
    """The entry's own tensor shape (the model parameter's)."""
    global_shape: tuple[int, ...]

    @property
    def chunk_sizes(self) -> tuple[int, ...]:
        return (1,) * (len(self.offsets) - len(self.shape)) + self.shape


def entry_layouts(meta_model: torch.nn.Module) -> dict[str, EntryLayout]:
    """{state-dict name: layout} of every tensor entry of a TP=1/PP=1 model's `sharded_state_dict()`."""
    state = meta_model.sharded_state_dict()
    apply_factories(state)
    layouts = {}
    for name, value in state.items():
        parts = list(nested_values(value)) if isinstance(value, (dict, list)) else [value]
        tensors = [p for p in parts if isinstance(p, ShardedTensor)]
        if tensors:
            layouts[name] = _layout_of(name, tensors)
    return layouts


def _layout_of(name: str, parts: list[ShardedTensor]) -> EntryLayout:
    """The one chunk the shards of an entry tile (e.g. the gate and up halves of a SwiGLU fc1)."""
    axes = parts[0].prepend_axis_num
    shape = tuple(parts[0].global_shape[axes:])
    keys = {p.key for p in parts}
    layer_offsets = {tuple(p.global_offset[:axes]) for p in parts}
    if len(keys) > 1 or len(layer_offsets) > 1 or sum(p.data.numel() for p in parts) != torch.Size(shape).numel():
        raise ValueError(f"{name}: its shards {sorted(keys)} do not tile one whole tensor of shape {shape}")
    offsets = tuple(parts[0].global_offset[:axes]) + (0,) * len(shape)
    return EntryLayout(parts[0].key, offsets, shape, tuple(parts[0].global_shape))


# ---- save ------------------------------------------------------------------------------------------------------


def save_lazily(
    meta_model: torch.nn.Module, folder: str | Path, make_tensor: Callable[[str], torch.Tensor], dtype: torch.dtype
) -> None:
    """Save `meta_model`'s checkpoint layout into `folder`, filling state-dict entry `name` with `make_tensor(name)`
    (the parameter's shape; cast to `dtype`) while it is written. `make_tensor` must be thread-safe."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    strategy = _LazyTorchDistStrategy(entry_layouts(meta_model), make_tensor, dtype)
    dist_checkpointing.save(meta_model.sharded_state_dict(), str(folder), sharded_strategy=strategy)


class _LazyTorchDistStrategy(SaveShardedStrategy):
    """torch_dist (version 1) as megatron-core's own strategy names it, so loads pick the usual reader."""

    def __init__(self, layouts: dict[str, EntryLayout], make_tensor: Callable[[str], torch.Tensor], dtype):
        super().__init__("torch_dist", 1)
        self.layouts, self.make_tensor, self.dtype = layouts, make_tensor, dtype

    @property
    def can_handle_sharded_objects(self) -> bool:
        return True

    def save(self, sharded_state_dict: dict, checkpoint_dir: Path) -> None:
        planner = _LazySavePlanner()
        for name, layout in self.layouts.items():
            planner.add_tensor(name, layout, self.dtype, self.make_tensor)
        for obj in nested_values(sharded_state_dict):
            if isinstance(obj, ShardedObject):
                planner.add_object(obj)
        writer = dcp.FileSystemWriter(str(checkpoint_dir), single_file_per_rank=False, thread_count=2)
        try:
            dcp.save({}, storage_writer=writer, planner=planner, no_dist=True)
        except CheckpointException:
            if planner.error is not None:  # the caller's own error (naming a tensor), not DCP's wrapper
                raise planner.error from None
            raise


class _LazySavePlanner(DefaultSavePlanner):
    """A DCP save planner whose write items are given up front and whose data is made in `resolve_data`."""

    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.items: list[WriteItem] = []
        self.makers: dict[tuple, Callable[[], torch.Tensor | io.BytesIO]] = {}
        self.error: Exception | None = None
        """The first exception raised while making data (DCP re-raises it wrapped)."""

    def add_tensor(self, name: str, layout: EntryLayout, dtype: torch.dtype, make_tensor: Callable) -> None:
        def make() -> torch.Tensor:
            full = make_tensor(name)
            if tuple(full.shape) != layout.shape:
                raise ValueError(f"{name}: made tensor of shape {tuple(full.shape)}, the model has {layout.shape}")
            return full.to(dtype).reshape(layout.chunk_sizes)

        index = MetadataIndex(layout.key, layout.offsets)
        chunk = ChunkStorageMetadata(offsets=torch.Size(layout.offsets), sizes=torch.Size(layout.chunk_sizes))
        properties, size = TensorProperties(dtype=dtype), torch.Size(layout.global_shape)
        data = TensorWriteData(chunk=chunk, properties=properties, size=size)
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


# ---- load ------------------------------------------------------------------------------------------------------


def load_entries(folder: str | Path, layouts: dict[str, EntryLayout], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """{name: tensor in `dtype`} for the given entries, read from the checkpoint in `folder` (any TP/PP); a tensor
    the checkpoint lacks or holds in another global shape is named."""
    reader = dcp.FileSystemReader(str(folder))
    saved = reader.read_metadata().state_dict_metadata
    for name, layout in layouts.items():
        found = saved.get(layout.key)
        if found is None or tuple(found.size) != layout.global_shape:
            what = "missing" if found is None else f"of shape {tuple(found.size)}"
            raise ValueError(f"{folder}: tensor {layout.key!r} ({name}) is {what}, expected {layout.global_shape}")
    buffers = {name: torch.empty(layout.chunk_sizes, dtype=dtype) for name, layout in layouts.items()}
    dcp.load({}, storage_reader=reader, planner=_ChunkLoadPlanner(layouts, buffers), no_dist=True)
    return {name: buffers[name].reshape(layout.shape) for name, layout in layouts.items()}


class _ChunkLoadPlanner(DefaultLoadPlanner):
    """Reads one chunk per entry (its layer of a stacked tensor) into a buffer of its own."""

    def __init__(self, layouts: dict[str, EntryLayout], buffers: dict[str, torch.Tensor]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.layouts = layouts
        self.by_chunk = {(layout.key, layout.offsets): buffers[name] for name, layout in layouts.items()}

    def create_local_plan(self) -> LoadPlan:
        items = []
        for layout in self.layouts.values():
            chunk = ChunkStorageMetadata(offsets=torch.Size(layout.offsets), sizes=torch.Size(layout.chunk_sizes))
            saved = self.metadata.state_dict_metadata[layout.key]
            items += create_read_items_for_chunk_list(layout.key, saved, [chunk])
        return LoadPlan(items)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        return self.by_chunk[index.fqn, tuple(index.offset)]
