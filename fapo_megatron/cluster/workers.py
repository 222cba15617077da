"""Worker groups: one Ray actor per rank of a role, pinned to a pool's bundles, called all together.

A worker class is a plain Python class (the Megatron actor, an engine host). The group wraps it in a Ray
actor host that first sets the rank's torch.distributed environment (see fapo_megatron/dist_env.py) and then
builds it, so the class can call `init_distributed_from_env()` in __init__.
A rank that raises, or whose process dies, surfaces as a WorkerError naming the role and the rank.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Iterator, Sequence
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from fapo_megatron.cluster.bundles import Pool
from fapo_megatron.dist_env import DistEnv


class WorkerError(RuntimeError):
    """A worker of a group failed; names the role, rank and method, with the remote error's last line."""

    def __init__(self, role: str, rank: int, method: str, detail: str, remote_traceback: str = ""):
        super().__init__(f"{role} worker rank {rank} failed in {method}(): {detail}")
        self.role = role
        self.rank = rank
        self.method = method
        self.detail = detail
        self.remote_traceback = remote_traceback
        """The full remote error text (traceback on a raise, Ray's death report on a crash)."""


class _WorkerHost:
    """The Ray actor body: learns where it runs, takes the rank environment, then hosts the worker object."""

    def __init__(self):
        self._worker = None

    def node_info(self) -> tuple[str, list[int]]:
        return ray.util.get_node_ip_address(), [int(gpu) for gpu in ray.get_gpu_ids()]

    def free_port(self) -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("", 0))
            return probe.getsockname()[1]

    def start(self, env: dict[str, str], worker_cls: type, args: tuple, kwargs: dict[str, Any]) -> int:
        os.environ.update(env)
        self._worker = worker_cls(*args, **kwargs)
        return os.getpid()

    def call(self, method: str, args: tuple, kwargs: dict[str, Any]) -> Any:
        return getattr(self._worker, method)(*args, **kwargs)

    def stream(self, method: str, args: tuple, kwargs: dict[str, Any]) -> Iterator[Any]:
        yield from getattr(self._worker, method)(*args, **kwargs)


_RemoteHost = ray.remote(_WorkerHost)
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


class WorkerGroup:
    """`num_workers` ranks of `role`, rank r on logical bundle `bundles[r]` of `pool` (default r), each hosting a
    `worker_cls` built with `init_args`, `init_kwargs` and its own `rank_kwargs[r]`.

    env: extra environment variables for every worker process, set when the process starts.
    share: fraction of a bundle each worker takes (roles that time-share a bundle split it).
    master_port: torch.distributed rendezvous port on rank 0's node; 0 picks a free one there.
    """

    def __init__(
        self,
        role: str,
        worker_cls: type,
        pool: Pool,
        num_workers: int,
        env: dict[str, str] | None = None,
        init_args: tuple = (),
        init_kwargs: dict[str, Any] | None = None,
        *,
        bundles: Sequence[int] | None = None,
        rank_kwargs: Sequence[dict[str, Any]] | None = None,
        share: float = 1.0,
        master_port: int = 0,
    ):
        bundles = list(range(num_workers)) if bundles is None else list(bundles)
        rank_kwargs = [{}] * num_workers if rank_kwargs is None else list(rank_kwargs)
        if len(bundles) != num_workers or len(rank_kwargs) != num_workers:
            raise ValueError(f"{role}: {len(bundles)} bundles and {len(rank_kwargs)} kwargs for {num_workers} ranks")
        if not 0 < num_workers <= pool.num_bundles:
            raise ValueError(
                f"{role}: {num_workers} workers asked but pool {pool.name!r} has {pool.num_bundles} bundles"
            )
        self.role = role
        self.pool = pool
        self.num_workers = num_workers
        options: dict[str, Any] = dict(pool.worker_resources(share))
        if env:
            options["runtime_env"] = {"env_vars": {key: str(value) for key, value in env.items()}}
        self.actors = [
            _RemoteHost.options(**options, scheduling_strategy=pool.scheduling(bundle)).remote() for bundle in bundles
        ]
        try:
            nodes = self.get([actor.node_info.remote() for actor in self.actors], "node_info")
            port = master_port or self.get([self.actors[0].free_port.remote()], "free_port")[0]
            self.rank_envs = rank_environments(nodes, port, pool.device, pool.bundle_nodes)
            self.master_addr, self.master_port = nodes[0][0], port
            refs = [
                actor.start.remote(rank_env, worker_cls, tuple(init_args), {**(init_kwargs or {}), **kwargs})
                for actor, rank_env, kwargs in zip(self.actors, self.rank_envs, rank_kwargs)
            ]
            self.pids = self.get(refs, f"{worker_cls.__name__}.__init__")
        except BaseException:
            self.shutdown()
            raise

    def call(self, method: str, *args, **kwargs) -> list[Any]:
        """Run `method(*args, **kwargs)` on every rank; results in rank order."""
        return self.get(self.call_async(method, *args, **kwargs), method)

    def stream(self, method: str, *args, **kwargs) -> Iterator[Any]:
        """Run generator `method` on every rank; its items as they arrive, from whichever rank yields first.

        Built on Ray's streaming generators (`num_returns="streaming"`): each yield of a worker becomes an object
        the moment it is produced, so the caller consumes a rank's items while that rank still works. A rank that
        raises surfaces as a WorkerError naming it, as with `call`.
        """
        generators = {
            actor.stream.options(num_returns="streaming").remote(method, args, kwargs): rank
            for rank, actor in enumerate(self._live_actors())
        }
        pending = list(generators)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for generator in ready:
                try:
                    ref = next(generator)
                except StopIteration:
                    continue
                yield self._result(ref, generators[generator], method)
                pending.append(generator)

    def call_async(self, method: str, *args, **kwargs) -> list[ray.ObjectRef]:
        """Start `method` on every rank; collect with `get(refs, method)` to have failures named."""
        return [actor.call.remote(method, args, kwargs) for actor in self._live_actors()]

    def call_each(self, method: str, args_per_rank: Sequence[tuple], **kwargs) -> list[Any]:
        """Run `method(*args_per_rank[r], **kwargs)` on rank r (e.g. each rank's shard of a batch)."""
        if len(args_per_rank) != self.num_workers:
            raise ValueError(
                f"{self.role}.{method}: {len(args_per_rank)} argument tuples for {self.num_workers} ranks"
            )
        actors = self._live_actors()
        refs = [actor.call.remote(method, tuple(args), kwargs) for actor, args in zip(actors, args_per_rank)]
        return self.get(refs, method)

    def call_rank(self, rank: int, method: str, *args, **kwargs) -> Any:
        """Run `method` on one rank only."""
        return self.get([self.call_rank_async(rank, method, *args, **kwargs)], method, ranks=[rank])[0]

    def call_rank_async(self, rank: int, method: str, *args, **kwargs) -> ray.ObjectRef:
        """Start `method` on one rank; collect with `get([ref], method, ranks=[rank])` to have a failure named."""
        return self._live_actors()[rank].call.remote(method, args, kwargs)

    def get(
        self, refs: Sequence[ray.ObjectRef], method: str = "?", timeout_s: float | None = None, ranks=None
    ) -> list[Any]:
        """Results of `refs` (refs[i] from rank ranks[i], default i), raising the first failure as a WorkerError.

        Failures are reported as they happen, so a rank that died is named even while the others stay blocked
        in a collective waiting for it.
        """
        ranks = list(range(len(refs))) if ranks is None else list(ranks)
        rank_of = {ref: rank for ref, rank in zip(refs, ranks)}
        position = {ref: index for index, ref in enumerate(refs)}
        results: list[Any] = [None] * len(refs)
        pending = list(refs)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while pending:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, pending = ray.wait(pending, num_returns=1, timeout=remaining)
            if not ready:
                waiting = sorted(rank_of[ref] for ref in pending)
                raise WorkerError(self.role, waiting[0], method, f"no result within {timeout_s:g} s (ranks {waiting})")
            for ref in ready:
                results[position[ref]] = self._result(ref, rank_of[ref], method)
        return results

    def shutdown(self) -> None:
        """Kill every worker process of the group (idempotent)."""
        for actor in getattr(self, "actors", []):
            try:
                ray.kill(actor, no_restart=True)
            except (RayActorError, ValueError):
                pass
        self.actors = []

    def _live_actors(self) -> list:
        if not self.actors:
            raise RuntimeError(f"worker group {self.role!r} was shut down")
        return self.actors

    def _result(self, ref: ray.ObjectRef, rank: int, method: str) -> Any:
        try:
            return ray.get(ref)
        except RayTaskError as err:
            text = _ANSI_ESCAPE.sub("", str(err))
            raise WorkerError(self.role, rank, method, _last_line(text), text) from err
        except RayActorError as err:
            text = _ANSI_ESCAPE.sub("", str(err))
            raise WorkerError(self.role, rank, method, f"worker process died ({_first_line(text)})", text) from err
        except GetTimeoutError as err:
            raise WorkerError(self.role, rank, method, "timed out", str(err)) from err


def rank_environments(
    nodes: Sequence[tuple[str, list[int]]],
    master_port: int,
    device: str,
    pool_gpus: Sequence[tuple[str, int | None]] = (),
) -> list[dict[str, str]]:
    """The environment each rank's process gets, given (node IP, GPU ids) per rank in rank order.

    LOCAL_RANK counts ranks on the same node in rank order. On cuda, Ray narrows CUDA_VISIBLE_DEVICES to a
    worker's own GPU; it is widened to the pool's GPUs on that node (`pool_gpus`: (node, GPU id) of every
    bundle; default the group's own), so LOCAL_RANK (the rank's position there) is its device index, NCCL sees
    its peers, and an engine of tp devices reaches the ones placement.EnginePlacement.gpu_ids names.
    Rendezvous is on rank 0's node.
    """
    by_node: dict[str, list[int]] = {}
    for rank, (node, _) in enumerate(nodes):
        by_node.setdefault(node, []).append(rank)
    envs = []
    for rank, (node, gpus) in enumerate(nodes):
        dist_env = DistEnv(
            rank=rank,
            world_size=len(nodes),
            local_rank=by_node[node].index(rank),
            local_world_size=len(by_node[node]),
            master_addr=nodes[0][0],
            master_port=master_port,
            backend="nccl" if device == "cuda" else "gloo",
        )
        env = dist_env.as_env()
        if device == "cuda":
            if len(gpus) != 1:
                raise RuntimeError(f"rank {rank} on {node} was given GPUs {gpus}; each worker needs exactly one")
            node_gpus = sorted({gpu for peer in by_node[node] for gpu in nodes[peer][1]})
            node_gpus = sorted({gpu for where, gpu in pool_gpus if where == node} | set(node_gpus))
            env["LOCAL_RANK"] = str(node_gpus.index(gpus[0]))
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, node_gpus))
        envs.append(env)
    return envs


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else text


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text
