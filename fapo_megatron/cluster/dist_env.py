"""The torch.distributed environment a WorkerGroup gives each worker, and the init that consumes it.

Every worker process gets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT and
FAPO_DIST_BACKEND (gloo on cpu, nccl on cuda) in os.environ before its class is built. On cuda,
CUDA_VISIBLE_DEVICES lists the group's GPUs on that node, so LOCAL_RANK is this worker's device index
(as with torchrun). No Ray import: worker classes use this without knowing how they were launched.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "FAPO_DIST_BACKEND")


@dataclass(frozen=True, kw_only=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    backend: str
    """gloo or nccl."""

    def as_env(self) -> dict[str, str]:
        return dict(
            zip(
                ENV_KEYS,
                (
                    str(self.rank),
                    str(self.world_size),
                    str(self.local_rank),
                    str(self.local_world_size),
                    self.master_addr,
                    str(self.master_port),
                    self.backend,
                ),
            )
        )

    @classmethod
    def from_environ(cls, env: Mapping[str, str] | None = None) -> DistEnv:
        env = os.environ if env is None else env
        missing = [key for key in ENV_KEYS if key not in env]
        if missing:
            raise RuntimeError(f"torch.distributed environment incomplete: {missing} not set (not in a WorkerGroup?)")
        return cls(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env["LOCAL_RANK"]),
            local_world_size=int(env["LOCAL_WORLD_SIZE"]),
            master_addr=env["MASTER_ADDR"],
            master_port=int(env["MASTER_PORT"]),
            backend=env["FAPO_DIST_BACKEND"],
        )


def init_distributed_from_env(timeout_s: float = 600.0) -> DistEnv:
    """Join the worker group's default process group (selecting this rank's GPU first on nccl)."""
    dist_env = DistEnv.from_environ()
    if dist_env.backend == "nccl":
        torch.cuda.set_device(dist_env.local_rank)
    torch.distributed.init_process_group(
        backend=dist_env.backend,
        init_method=f"tcp://{_host_for_url(dist_env.master_addr)}:{dist_env.master_port}",
        rank=dist_env.rank,
        world_size=dist_env.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return dist_env


def _host_for_url(address: str) -> str:
    return f"[{address}]" if ":" in address else address
