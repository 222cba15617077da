"""Weight transports from the trainer into an SGLang server, one class per transport (as slime does).

TensorTransport:      bucket -> flatten (one tensor per dtype) -> serialize (CUDA IPC handle on GPU) -> POST
                      /update_weights_from_tensor.
DistributedTransport: bucket -> POST /update_weights_from_distributed (names, dtypes, shapes) + broadcast each tensor
                      from rank 0 of a side group (NCCL on GPU) that the server joined via /init_weights_update_group.
The engine brackets a whole sync with pause/flush and continue and bumps the weight version; transports only move
buckets.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fapo_megatron.engine_protocol import EngineError, WeightBucket
from fapo_megatron.engines.sglang_client import SGLangClient
from fapo_megatron.engines.weight_sync import flatten_bucket, serialize_flattened_bucket, tensor_bytes


@dataclass
class TransportStats:
    buckets: int = 0
    bytes: int = 0
    bucket_bytes: list[int] = field(default_factory=list)


class TensorTransport:
    """Colocated: the server reads the bucket from the trainer's memory (same node, same GPUs).

    Each engine TP rank reads its own entry of `serialized_named_tensors` (tp_worker.py indexes it by tp_rank in
    every 0.5.x), so each gets a payload of its own, serialized from `rank_devices[rank]` (default: where the bucket
    is): one CUDA IPC handle per reader, since two ranks opening one handle break its producer-side refcount. After
    the server has answered, the copies are dropped and the IPC memory is released (torch.cuda.ipc_collect), as
    slime does after each bucket.
    """

    def __init__(self, client: SGLangClient, *, tp_size: int = 1, rank_devices: list[torch.device] | None = None):
        if tp_size < 1:
            raise ValueError(f"tp_size must be >= 1, got {tp_size}")
        if rank_devices is not None and len(rank_devices) != tp_size:
            raise ValueError(f"rank_devices names {len(rank_devices)} devices for tp_size {tp_size}")
        self.client = client
        self.tp_size = tp_size
        self.rank_devices = rank_devices
        self.stats = TransportStats()

    def connect(self) -> None:
        """Nothing to set up: every call carries its own handles."""

    def payloads(self, flat: torch.Tensor, metadata) -> tuple[list[str], list[torch.Tensor]]:
        """One serialized entry per TP rank, and the tensors they point at (kept alive until the server answers)."""
        devices = self.rank_devices or [flat.device] * self.tp_size
        copies = [flat if device == flat.device else flat.to(device) for device in devices]
        return [serialize_flattened_bucket(copy, metadata) for copy in copies], copies

    def send(self, bucket: WeightBucket, *, weight_version: str) -> None:
        groups = flatten_bucket(bucket)  # one request per dtype: every SGLang 0.5.x rebuilds it
        while groups:
            flat, metadata = groups.pop(0)  # held nowhere else, so each group's memory goes once it is sent
            entries, copies = self.payloads(flat, metadata)
            self.client.update_weights_from_tensor(
                entries, load_format="flattened_bucket", flush_cache=False, weight_version=weight_version
            )
            on_cuda = any(copy.is_cuda for copy in copies)
            del flat, copies, entries  # the server has answered, so it has copied out of the shared memory
            if on_cuda:
                torch.cuda.ipc_collect()
        _record(self.stats, bucket)

    def close(self) -> None:
        """Nothing to tear down."""


class DistributedTransport:
    """Separate pools: rank 0 of a side process group broadcasts each tensor to all the server's TP ranks."""

    def __init__(
        self,
        client: SGLangClient,
        *,
        master_address: str,
        master_port: int,
        server_world_size: int,
        group_name: str = "fapo_weight_sync",
        backend: str = "nccl",
        device: str | torch.device = "cuda",
    ):
        self.client = client
        self.master_address = master_address
        self.master_port = master_port
        self.world_size = 1 + server_world_size
        self.group_name = group_name
        self.backend = backend
        self.device = torch.device(device)
        self.stats = TransportStats()
        self._group = None

    def connect(self) -> None:
        """Both sides join the rendezvous at once: the server's call blocks until we join too."""
        if self._group is not None:
            return
        from fapo_megatron.engines.weight_sync import init_custom_process_group

        def join_server():
            self.client.init_weights_update_group(
                master_address=self.master_address,
                master_port=self.master_port,
                rank_offset=1,
                world_size=self.world_size,
                group_name=self.group_name,
                backend=self.backend,
            )

        _run_beside(
            join_server,
            lambda: setattr(
                self,
                "_group",
                init_custom_process_group(
                    backend=self.backend,
                    init_method=f"tcp://{self.master_address}:{self.master_port}",
                    world_size=self.world_size,
                    rank=0,
                    group_name=self.group_name,
                ),
            ),
        )

    def send(self, bucket: WeightBucket, *, weight_version: str) -> None:
        if self._group is None:
            raise EngineError("DistributedTransport.send before connect()")
        tensors = [tensor.detach().to(self.device).contiguous() for _, tensor in bucket]

        def announce():
            self.client.update_weights_from_distributed(
                names=[name for name, _ in bucket],
                dtypes=[str(t.dtype).replace("torch.", "") for t in tensors],
                shapes=[list(t.shape) for t in tensors],
                group_name=self.group_name,
                flush_cache=False,
                weight_version=weight_version,
            )

        def broadcast():
            for tensor in tensors:  # same order as the names: the server posts one receive per name
                torch.distributed.broadcast(tensor, src=0, group=self._group)

        _run_beside(announce, broadcast)
        _record(self.stats, bucket)

    def close(self) -> None:
        if self._group is None:
            return
        try:
            self.client.destroy_weights_update_group(self.group_name)
        finally:
            torch.distributed.destroy_process_group(self._group)
            self._group = None


def _run_beside(http_call: Callable[[], None], local_work: Callable[[], None]) -> None:
    """Run a blocking HTTP call in a thread while this thread does the matching collective; re-raise either error."""
    errors: list[BaseException] = []

    def target():
        try:
            http_call()
        except BaseException as error:  # noqa: BLE001 - handed to the caller below
            errors.append(error)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    try:
        local_work()
    finally:
        thread.join()
    if errors:
        raise errors[0]


def _record(stats: TransportStats, bucket: WeightBucket) -> None:
    nbytes = sum(tensor_bytes(t) for _, t in bucket)
    stats.buckets += 1
    stats.bytes += nbytes
    stats.bucket_bytes.append(nbytes)
