"""The one place that knows whether Megatron runs on CUDA (NCCL) or on CPU (gloo).

megatron-core is written for CUDA: it calls `torch.cuda.current_device()` for allocations, creates tensors
with `device="cuda"`, keeps its model-parallel RNG states on the CUDA generator and checks parameters with
`param.type() == "torch.cuda.FloatTensor"`. On a CPU machine `setup("cpu")` maps all of that onto the CPU:

* `torch.cuda.current_device / set_device / synchronize / empty_cache / streams` become CPU no-ops,
* a torch function mode rewrites `device="cuda"` arguments and `Tensor.cuda()` to the CPU and reports
  CPU tensors as `torch.cuda.*Tensor` to `Tensor.type()` (the optimizer's dtype checks),
* the RNG tracker's "CUDA" generator is the CPU default generator.

On CUDA `setup("cuda")` only selects the local GPU; nothing is patched. Everything else in the code base asks
`device()` for where tensors go and never branches on the platform itself.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode


@dataclass(frozen=True)
class DistEnv:
    """torch.distributed rendezvous read from the standard environment variables."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int

    @classmethod
    def from_environ(cls) -> DistEnv:
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise RuntimeError(f"torch.distributed environment incomplete: {', '.join(missing)} not set")
        return cls(
            rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
            local_rank=int(os.environ.get("LOCAL_RANK", os.environ["RANK"])),
            master_addr=os.environ["MASTER_ADDR"],
            master_port=int(os.environ["MASTER_PORT"]),
        )


_DEVICE: torch.device | None = None
_CPU_MODE: _CudaToCpuMode | None = None


def setup(device_kind: str, *, timeout_minutes: int = 30) -> DistEnv:
    """Initialise torch.distributed from the environment for `device_kind` ('cpu' or 'cuda'); idempotent."""
    global _DEVICE
    if device_kind not in ("cpu", "cuda"):
        raise ValueError(f"device kind {device_kind!r}: choose 'cpu' or 'cuda'")
    env = DistEnv.from_environ()
    if device_kind == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("cluster.device=cuda but torch sees no CUDA device")
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        _DEVICE = torch.device("cuda", torch.cuda.current_device())
        backend = "nccl"
    else:
        _install_cpu_patches()
        _DEVICE = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    return env


def device() -> torch.device:
    """Where this rank's model and batches live."""
    if _DEVICE is None:
        raise RuntimeError("fapo_megatron.megatron.platform.setup() has not been called")
    return _DEVICE


def on_cpu() -> bool:
    """True when megatron runs over gloo on the CPU (only for choices megatron itself cannot make)."""
    return device().type == "cpu"


def synchronize() -> None:
    """Wait for queued device work (timings, before freeing memory)."""
    if device().type == "cuda":
        torch.cuda.synchronize()


def empty_cache() -> None:
    if device().type == "cuda":
        torch.cuda.empty_cache()


def pinned_cpu_like(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU buffer to offload `tensor` into (pinned when a GPU makes pinning useful)."""
    return torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=device().type == "cuda")


# ---------------------------------------------------------------------------------------------- CPU patches


def _to_cpu_device(value):
    if isinstance(value, str) and value.startswith("cuda"):
        return "cpu"
    if isinstance(value, torch.device) and value.type == "cuda":
        return torch.device("cpu")
    return value


class _CudaToCpuMode(TorchFunctionMode):
    """Sends every `device="cuda"` allocation and `.cuda()` copy to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # megatron's optimizers accept parameters only if they report a CUDA tensor type.
            return func(args[0]).replace("torch.", "torch.cuda.", 1)
        args = tuple(_to_cpu_device(a) for a in args)
        if kwargs:
            kwargs = {k: _to_cpu_device(v) for k, v in kwargs.items()}
            if kwargs.get("pin_memory"):
                kwargs["pin_memory"] = False
        return func(*args, **(kwargs or {}))


class _NullStream:
    """Stands in for a CUDA stream: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, event=None):
        return event


def _cpu_get_rng_state(device="cuda", *args, **kwargs):
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state, device=-1, graph_safe=False, *args, **kwargs):
    torch.set_rng_state(new_state)


def _cpu_manual_seed(seed) -> None:
    # torch.manual_seed itself calls torch.cuda.manual_seed_all, so seed the CPU generator directly.
    torch.default_generator.manual_seed(int(seed))


def _install_cpu_patches() -> None:
    """Map megatron-core's CUDA calls to the CPU (once per process)."""
    global _CPU_MODE
    if _CPU_MODE is not None:
        return
    if torch.cuda.is_available():
        raise RuntimeError("refusing to patch torch.cuda on a machine with a GPU; use cluster.device=cuda")
    from megatron.core.tensor_parallel import random as mcore_random

    cuda = torch.cuda
    cuda.current_device = lambda: "cpu"
    cuda.set_device = lambda *args, **kwargs: None
    cuda.synchronize = lambda *args, **kwargs: None
    cuda.empty_cache = lambda: None
    cuda.current_stream = lambda *args, **kwargs: _NullStream()
    cuda.default_stream = lambda *args, **kwargs: _NullStream()
    cuda.Stream = _NullStream
    cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()
    cuda.get_rng_state = _cpu_get_rng_state
    cuda.random.get_rng_state = _cpu_get_rng_state
    cuda.set_rng_state = _cpu_set_rng_state
    cuda.manual_seed = _cpu_manual_seed
    mcore_random._set_cuda_rng_state = _cpu_set_rng_state
    mcore_random._get_cuda_rng_state = _cpu_get_rng_state
    _CPU_MODE = _CudaToCpuMode()
    _CPU_MODE.__enter__()
