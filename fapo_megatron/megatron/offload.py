"""Move the actor's parameters and optimizer state off the device and back, keeping every tensor object alive.

Megatron's parameters, gradients and distributed-optimizer shards are views into a few large buffers, so the
unit of offload is a tensor *storage*: its bytes are copied to (pinned) CPU memory and the storage is resized to
0, which frees the device memory while all views stay valid; onload resizes it back and copies the bytes in.
Gradient buffers are freed without a copy and come back zeroed (every step starts from zero gradients).
On a CPU machine the same code runs: the copies are host-to-host and the memory is really released.
"""

from __future__ import annotations

import torch

from fapo_megatron.megatron import platform


def _byte_view(storage: torch.UntypedStorage, device: torch.device) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=device).set_(storage)


class StateOffloader:
    """Offload / onload of a megatron DDP model and its optimizer."""

    def __init__(self, ddp_model, optimizer):
        self.ddp_model = ddp_model
        self.optimizer = optimizer
        self._saved: list[tuple[torch.UntypedStorage, torch.Tensor]] = []
        self._freed_grads: list[tuple[torch.UntypedStorage, int]] = []
        self.offloaded = False

    def _storages(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(tensors whose values must survive, gradient tensors that may be dropped)."""
        keep, grads = [], []
        for buffer in self.ddp_model.buffers + self.ddp_model.expert_parallel_buffers:
            keep.append(buffer.param_data)
            grads.append(buffer.grad_data)
        keep.extend(p for p in self.ddp_model.module.parameters())
        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            inner = opt.optimizer
            for group in inner.param_groups:
                keep.extend(group["params"])
            for state in inner.state.values():
                keep.extend(v for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
        return [t for t in keep if t is not None], [g for g in grads if g is not None]

    def offload(self) -> None:
        if self.offloaded:
            return
        platform.synchronize()
        keep, grads = self._storages()
        seen: set[int] = set()
        for grad in grads:
            storage = grad.untyped_storage()
            if storage.data_ptr() not in seen and storage.nbytes() > 0:
                seen.add(storage.data_ptr())
                self._freed_grads.append((storage, storage.nbytes()))
                storage.resize_(0)
        for tensor in keep:
            storage = tensor.untyped_storage()
            if storage.data_ptr() in seen or storage.nbytes() == 0:
                continue
            seen.add(storage.data_ptr())
            source = _byte_view(storage, tensor.device)
            copy = platform.pinned_cpu_like(source)
            copy.copy_(source)
            self._saved.append((storage, copy))
            storage.resize_(0)
        platform.synchronize()
        platform.empty_cache()
        self.offloaded = True

    def onload(self) -> None:
        if not self.offloaded:
            return
        device = platform.device()
        for storage, copy in self._saved:
            storage.resize_(copy.numel())
            _byte_view(storage, device).copy_(copy, non_blocking=True)
        for storage, nbytes in self._freed_grads:
            storage.resize_(nbytes)
            _byte_view(storage, device).zero_()
        platform.synchronize()
        self._saved, self._freed_grads = [], []
        self.offloaded = False
