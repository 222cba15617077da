"""Move the actor's parameters, gradients and optimizer state off the device and back, each kind on its own,
keeping every tensor object alive.

Megatron's parameters, gradients and distributed-optimizer shards are views into a few large buffers, so the
unit of offload is a tensor *storage*: its bytes are copied to (pinned) CPU memory and the storage is resized to
0, which frees the device memory while all views stay valid; onload resizes it back and copies the bytes in.
Gradient buffers are freed without a copy and come back zeroed (every step starts from zero gradients).
The kinds move separately because the phases need different things: the log-prob pass only parameters, the
update everything, a checkpoint parameters and optimizer state, the rollout nothing.
On a CPU machine the same code runs: the copies are host-to-host and the memory is really released, so
`resident_bytes` (read from the storages) is the same ledger on CPU as on a GPU.
"""

from __future__ import annotations

import torch

from fapo_megatron.megatron import platform

KINDS = ("params", "grads", "optimizer")
"""What the actor holds: model parameters (bf16/fp32 buffers), gradient buffers, optimizer state (fp32 main
parameter shards with the distributed optimizer, Adam moments)."""


def _byte_view(storage: torch.UntypedStorage, device: torch.device) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=device).set_(storage)


class StateOffloader:
    """Offload / onload of a megatron DDP model and its optimizer, per kind."""

    def __init__(self, ddp_model, optimizer):
        self.ddp_model = ddp_model
        self.optimizer = optimizer
        self._saved: dict[str, list[tuple[torch.UntypedStorage, torch.Tensor]]] = {kind: [] for kind in KINDS}
        self._freed_grads: list[tuple[torch.UntypedStorage, int]] = []
        self.resident: set[str] = set(KINDS)

    def _storages(self) -> dict[str, list[torch.UntypedStorage]]:
        """Each kind's distinct storages; one shared with an earlier kind counts there (fp32 main parameters
        without the distributed optimizer are the model's own)."""
        tensors: dict[str, list[torch.Tensor]] = {kind: [] for kind in KINDS}
        for buffer in self.ddp_model.buffers + self.ddp_model.expert_parallel_buffers:
            tensors["params"].append(buffer.param_data)
            tensors["grads"].append(buffer.grad_data)
        tensors["params"].extend(self.ddp_model.module.parameters())
        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            inner = opt.optimizer
            for group in inner.param_groups:
                tensors["optimizer"].extend(group["params"])
            for state in inner.state.values():
                tensors["optimizer"].extend(v for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
        seen: set[int] = set()
        out: dict[str, list[torch.UntypedStorage]] = {kind: [] for kind in KINDS}
        for kind in KINDS:
            for tensor in tensors[kind]:
                if tensor is None:
                    continue
                storage = tensor.untyped_storage()
                key = storage._cdata  # the storage itself: views share it, offloaded (empty) ones stay apart
                if key not in seen:
                    seen.add(key)
                    out[kind].append(storage)
        return out

    def resident_bytes(self) -> dict[str, int]:
        """Bytes each kind holds in memory right now (offloaded storages hold 0)."""
        if not self.resident:
            return {kind: 0 for kind in KINDS}
        return {kind: sum(s.nbytes() for s in storages) for kind, storages in self._storages().items()}

    def offload(self, kinds: tuple[str, ...] = KINDS) -> None:
        """Free `kinds` from the device: gradients are dropped, everything else copied to host memory."""
        kinds = tuple(k for k in kinds if k in self.resident)
        if not kinds:
            return
        platform.synchronize()
        storages = self._storages()
        for kind in kinds:
            for storage in storages[kind]:
                if storage.nbytes() == 0:
                    continue
                if kind == "grads":
                    self._freed_grads.append((storage, storage.nbytes()))
                else:
                    source = _byte_view(storage, platform.device())
                    copy = platform.pinned_cpu_like(source)
                    copy.copy_(source)
                    self._saved[kind].append((storage, copy))
                storage.resize_(0)
            self.resident.discard(kind)
        platform.synchronize()
        platform.empty_cache()

    def onload(self, kinds: tuple[str, ...] = KINDS) -> None:
        """Bring `kinds` back; the next step sees exactly the state it left (gradients zeroed)."""
        device = platform.device()
        for kind in kinds:
            if kind in self.resident:
                continue
            if kind == "grads":
                for storage, nbytes in self._freed_grads:
                    storage.resize_(nbytes)
                    _byte_view(storage, device).zero_()
                self._freed_grads = []
            else:
                for storage, copy in self._saved[kind]:
                    storage.resize_(copy.numel())
                    _byte_view(storage, device).copy_(copy, non_blocking=True)
                self._saved[kind] = []
            self.resident.add(kind)
        platform.synchronize()
