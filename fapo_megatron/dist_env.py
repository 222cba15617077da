"""The torch.distributed environment of a rank and the one init of its default process group.

A WorkerGroup (cluster/workers.py) gives every worker process RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
MASTER_ADDR, MASTER_PORT and FAPO_DIST_BACKEND (gloo on cpu, nccl on cuda) in os.environ before its class is
built. On cuda, CUDA_VISIBLE_DEVICES lists the group's GPUs on that node, so LOCAL_RANK is this worker's device
index (as with torchrun). A process started without a worker group (tests, the converter) sets the first four
itself. Plain torch, nothing of the package: cluster/ writes the environment, megatron/ and roles/ join with it.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "FAPO_DIST_BACKEND")
REQUIRED_KEYS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

PROCESS_GROUP_TIMEOUT_MINUTES = 30
"""How long a rank waits in a collective for its peers before torch.distributed aborts, for the default group
and megatron-core's TP/PP/DP groups alike: ranks enter a collective apart by per-rank work (a distributed
checkpoint's shard writes, the weight export's gathers) that takes minutes at 32B on shared storage, and a dead
peer should still fail the job within half an hour so SLURM requeues it (megatron-core's own default)."""


@dataclass(frozen=True, kw_only=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    backend: str = ""
    """gloo or nccl; empty when the process sets none (the caller of `init_distributed_from_env` names it)."""

    def as_env(self) -> dict[str, str]:
        values = (self.rank, self.world_size, self.local_rank, self.local_world_size)
        values += (self.master_addr, self.master_port, self.backend)
        return dict(zip(ENV_KEYS, map(str, values)))

    @classmethod
    def from_environ(cls, env: Mapping[str, str] | None = None) -> DistEnv:
        """Read the environment; LOCAL_RANK / LOCAL_WORLD_SIZE default to RANK / WORLD_SIZE (one node)."""
        env = os.environ if env is None else env
        missing = [key for key in REQUIRED_KEYS if key not in env]
        if missing:
            raise RuntimeError(f"torch.distributed environment incomplete: {missing} not set (not in a WorkerGroup?)")
        return cls(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", env["RANK"])),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])),
            master_addr=env["MASTER_ADDR"],
            master_port=int(env["MASTER_PORT"]),
            backend=env.get("FAPO_DIST_BACKEND", ""),
        )


def init_distributed_from_env(backend: str = "") -> DistEnv:
    """Join the default process group (selecting this rank's GPU first on nccl); idempotent, so the worker and
    the megatron platform it builds share one group. `backend` defaults to FAPO_DIST_BACKEND."""
    dist_env = DistEnv.from_environ()
    backend = backend or dist_env.backend
    if backend not in ("gloo", "nccl"):
        raise RuntimeError(f"torch.distributed backend {backend!r}: FAPO_DIST_BACKEND must be gloo or nccl")
    if backend == "nccl":
        torch.cuda.set_device(dist_env.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{_host_for_url(dist_env.master_addr)}:{dist_env.master_port}",
            rank=dist_env.rank,
            world_size=dist_env.world_size,
            timeout=datetime.timedelta(minutes=PROCESS_GROUP_TIMEOUT_MINUTES),
        )
    return dist_env


def _host_for_url(address: str) -> str:
    return f"[{address}]" if ":" in address else address
