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

import torch
from torch.overrides import TorchFunctionMode

from fapo_megatron.dist_env import DistEnv, init_distributed_from_env

_DEVICE: torch.device | None = None
_CPU_MODE: _CudaToCpuMode | None = None


def setup(device_kind: str) -> DistEnv:
    """Join torch.distributed (`dist_env.init_distributed_from_env`) for `device_kind` ('cpu' or 'cuda');
    idempotent."""
    global _DEVICE
    if device_kind not in ("cpu", "cuda"):
        raise ValueError(f"device kind {device_kind!r}: choose 'cpu' or 'cuda'")
    if device_kind == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("cluster.device=cuda but torch sees no CUDA device")
        env = init_distributed_from_env("nccl")
        _DEVICE = torch.device("cuda", torch.cuda.current_device())
    else:
        _install_cpu_patches()
        env = init_distributed_from_env("gloo")
        _DEVICE = torch.device("cpu")
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
