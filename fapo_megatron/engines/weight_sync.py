"""Weight-sync helpers shared by every engine: size-bounded buckets, the flattened-bucket wire format, the
side process group SGLang's distributed update joins, and the push over such a group to a separate rollout pool
(send_buckets on actor rank 0, receive_buckets in every rollout worker).

The wire format is SGLang's `update_weights_from_tensor(load_format="flattened_bucket")` payload: one
base64 string per TP rank holding a pickled {"flattened_tensor": tensor, "metadata": [...]}, one request per dtype
of a bucket (see flatten_bucket).
  * CUDA tensors are pickled with multiprocessing's ForkingPickler, which torch reduces to a CUDA IPC
    handle: only metadata crosses HTTP, the server maps the trainer's memory and copies on the device.
    The trainer must keep the flattened tensor alive until the server has answered.
  * CPU tensors are pickled by value (plain pickle), which a CPU SGLang build and our CPU stand-in server
    decode; on GPU this path would copy every byte through HTTP, so it is for tests only.
Metadata entries are `types.SimpleNamespace`s with SGLang's FlattenedTensorMetadata fields (name, shape,
dtype, start_idx, end_idx, numel): SGLang reads them by attribute, and its restricted unpickler accepts
`types.*` and `torch.*` classes but would reject a class of ours.
"""

from __future__ import annotations

import base64
import io
import pickle
import types
from collections.abc import Iterable, Iterator
from datetime import timedelta
from multiprocessing.reduction import ForkingPickler

import torch

from fapo_megatron.engine_protocol import WeightBucket

MB = 1 << 20


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def bucket_named_tensors(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
) -> Iterator[WeightBucket]:
    """Group (name, tensor) pairs, in order, into buckets of at most `bucket_bytes`; a larger tensor goes alone."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    bucket: WeightBucket = []
    size = 0
    for name, tensor in named_tensors:
        nbytes = tensor_bytes(tensor)
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def flatten_bucket(bucket: WeightBucket) -> list[tuple[torch.Tensor, list[types.SimpleNamespace]]]:
    """One flattened tensor per dtype (in order of first appearance), each in its own dtype with element offsets.

    SGLang 0.5.3-0.5.5 rebuild a flattened bucket as `flat[start_idx:end_idx].reshape(shape).to(dtype)` (element
    offsets, one dtype), 0.5.6+ as `flat[start_idx:end_idx].view(dtype).reshape(shape)` (weight_sync/
    tensor_bucket.py). A single-dtype flat tensor with element offsets reads back bit-exact under both; a mixed
    raw-bytes layout would be cast element-wise by the older versions.
    """
    if not bucket:
        raise ValueError("cannot flatten an empty weight bucket")
    devices = {tensor.device for _, tensor in bucket}
    if len(devices) != 1:
        raise ValueError(f"a weight bucket must sit on one device, got {sorted(map(str, devices))}")
    by_dtype: dict[torch.dtype, WeightBucket] = {}
    for name, tensor in bucket:
        by_dtype.setdefault(tensor.dtype, []).append((name, tensor))
    flattened = []
    for dtype, group in by_dtype.items():
        parts, metadata, offset = [], [], 0
        for name, tensor in group:
            flat = tensor.detach().contiguous().view(-1)
            parts.append(flat)
            metadata.append(
                types.SimpleNamespace(
                    name=name,
                    shape=tensor.shape,
                    dtype=dtype,
                    start_idx=offset,
                    end_idx=offset + flat.numel(),
                    numel=flat.numel(),
                )
            )
            offset += flat.numel()
        flattened.append((torch.cat(parts), metadata))
    return flattened


def unflatten_bucket(flat: torch.Tensor, metadata) -> WeightBucket:
    """Inverse of flatten_bucket for one dtype group (views into `flat`)."""
    return [(m.name, flat[m.start_idx : m.end_idx].reshape(m.shape)) for m in metadata]


def serialize_flattened_bucket(flat: torch.Tensor, metadata) -> str:
    """One TP rank's `serialized_named_tensors` entry (see the module docstring for CUDA vs CPU)."""
    payload = {"flattened_tensor": flat, "metadata": metadata}
    if flat.is_cuda:
        _patch_cuda_ipc_device_ids()
        buffer = io.BytesIO()
        ForkingPickler(buffer).dump(payload)
        raw = buffer.getvalue()
    else:
        raw = pickle.dumps(payload)
    return base64.b64encode(raw).decode("ascii")


def _patch_cuda_ipc_device_ids() -> None:
    """Apply SGLang's reduction patch (device index -> GPU UUID) when present: CUDA_VISIBLE_DEVICES may differ."""
    try:
        from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
    except ImportError:
        return  # without SGLang here, trainer and server must see the GPUs under the same indices
    monkey_patch_torch_reductions()


def init_custom_process_group(
    *, backend: str, init_method: str, world_size: int, rank: int, group_name: str, timeout_s: float = 600.0
):
    """A process group beside the default one, built the way SGLang's `init_custom_process_group` builds its side.

    SGLang joins with the same group name through `tcp://master_address:master_port`; both ends must wrap the
    rendezvous store identically, so this mirrors that function (it uses torch's private group helper, as
    SGLang, vLLM and slime do).
    """
    from torch.distributed import distributed_c10d as c10d

    timeout = timedelta(seconds=timeout_s)
    store, rank, world_size = next(c10d.rendezvous(init_method, rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    store = c10d.PrefixStore(group_name, store)
    group, _ = c10d._new_process_group_helper(
        world_size, rank, [], backend, store, group_name=group_name, timeout=timeout
    )
    c10d._world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


def send_buckets(buckets: Iterable[WeightBucket], group, device: torch.device) -> None:
    """Broadcast a whole weight push from rank 0 of `group` to every other rank (`receive_buckets`): per bucket its
    layout (names, shapes, dtypes, offsets: a pickled byte tensor after its length), then one flat tensor per dtype;
    a zero length ends the push. The receivers need to know nothing in advance."""
    for bucket in buckets:
        groups = flatten_bucket([(name, tensor.to(device)) for name, tensor in bucket])
        _broadcast_bytes(pickle.dumps([metadata for _, metadata in groups]), group, device)
        for flat, _ in groups:
            torch.distributed.broadcast(flat, group=group, group_src=0)
    _broadcast_bytes(b"", group, device)


def receive_buckets(group, device: torch.device) -> Iterator[WeightBucket]:
    """The buckets `send_buckets` broadcasts, as they arrive (feed them to an engine's update_weights)."""
    while True:
        layout = _broadcast_bytes(None, group, device)
        if not layout:
            return
        bucket: WeightBucket = []
        for metadata in pickle.loads(layout):
            flat = torch.empty(metadata[-1].end_idx, dtype=metadata[0].dtype, device=device)
            torch.distributed.broadcast(flat, group=group, group_src=0)
            bucket += unflatten_bucket(flat, metadata)
        yield bucket


def _broadcast_bytes(payload: bytes | None, group, device: torch.device) -> bytes:
    """Rank 0 sends `payload`, the others (payload None) get it: its length, then its bytes."""
    length = torch.tensor([0 if payload is None else len(payload)], dtype=torch.int64, device=device)
    torch.distributed.broadcast(length, group=group, group_src=0)
    size = int(length.item())
    if size == 0:
        return b""
    if payload is None:
        data = torch.empty(size, dtype=torch.uint8, device=device)
    else:
        data = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device)
    torch.distributed.broadcast(data, group=group, group_src=0)
    return payload if payload is not None else data.cpu().numpy().tobytes()
