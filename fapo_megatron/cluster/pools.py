"""Ray session and resource pools: start or join Ray, reserve the placement groups, tear it all down.

`ray_session(cfg)` is the one way a run gets Ray. It starts a private local Ray (default) or joins
`cluster.ray_address`, creates the pools `compute_layout(cfg)` asks for, and on exit, on an exception, on
Ctrl-C or SIGTERM kills the run's worker groups, removes its placement groups and stops Ray; for a Ray it
started, every process Ray spawned (GCS, raylet, workers and their children) is then checked gone. A SIGKILL runs
none of that: for a Ray it started, a `lifetime.RunReaper` then kills every process of the run (a joined cluster's
Ray ends a dead driver's actors itself).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psutil
import ray
from ray.util.placement_group import remove_placement_group

from fapo_megatron.cluster.bundles import Pool, create_pool
from fapo_megatron.cluster.placement import PoolLayout, compute_layout
from fapo_megatron.cluster.workers import WorkerGroup
from fapo_megatron.config import Config
from fapo_megatron.lifetime import RunReaper

logger = logging.getLogger(__name__)

_PROCESS_EXIT_GRACE_S = 10.0


@dataclass(kw_only=True)
class RaySession:
    """What `ray_session` hands the trainer: the layout, its reserved pools and the groups made on them."""

    cfg: Config
    layout: PoolLayout
    pools: dict[str, Pool]
    started_local: bool
    temp_dir: str | None
    groups: list[WorkerGroup] = field(default_factory=list)

    def worker_group(
        self,
        role: str,
        worker_cls: type,
        *,
        init_args: tuple = (),
        init_kwargs: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        num_workers: int | None = None,
        engine_role: str = "",
    ) -> WorkerGroup:
        """A WorkerGroup of `role` on the pool and bundles the layout gives it; shut down with the session.

        `engine_role` (rollout, genrm): every rank gets the keyword `engine`, the EnginePlacement of the replica
        it hosts (None for a rank that hosts none, so for every rank when that role's engines have a pool of their
        own)."""
        spec = self.layout.pool_of(role)
        placements = self.layout.placements[role]
        num = num_workers if num_workers is not None else len(placements)
        rank_kwargs = None
        if engine_role:
            on_this_pool = self.layout.pool_of(engine_role) is spec
            hosted = {e.bundle: e for e in self.layout.engines[engine_role]} if on_this_pool else {}
            rank_kwargs = [{"engine": hosted.get(p.bundle)} for p in placements[:num]]
        group = WorkerGroup(
            role,
            worker_cls,
            self.pools[spec.name],
            num,
            env=env,
            init_args=init_args,
            init_kwargs=init_kwargs,
            bundles=[p.bundle for p in placements[:num]],
            rank_kwargs=rank_kwargs,
            share=spec.share,
            master_port=self.cfg.cluster.master_port,
        )
        self.groups.append(group)
        return group

    def close(self) -> None:
        for group in reversed(self.groups):
            with contextlib.suppress(Exception):
                group.shutdown()
        self.groups.clear()
        for pool in self.pools.values():
            with contextlib.suppress(Exception):
                remove_placement_group(pool.placement_group)
        self.pools.clear()


@contextlib.contextmanager
def ray_session(
    cfg: Config,
    *,
    create_pools: bool = True,
    pool_timeout_s: float = 120.0,
    num_cpus: int | None = None,
    cpus_per_gpu: float = 1.0,
) -> Iterator[RaySession]:
    """Start (or join) Ray, reserve the run's pools, and tear everything down on every way out.

    num_cpus: logical CPUs of a locally started Ray (default: the machine's, or what the pools need if more,
    so a CPU-only machine can host a layout larger than its core count). Ignored when joining a cluster.
    """
    layout = compute_layout(cfg, cpus_per_gpu)
    if ray.is_initialized():
        raise RuntimeError("Ray is already initialized in this process; ray_session must own the connection")
    address = cfg.cluster.ray_address
    session = RaySession(cfg=cfg, layout=layout, pools={}, started_local=not address, temp_dir=None)
    ray_processes: list[psutil.Process] = []
    reaper = None
    previous_handler = _raise_on_sigterm()
    try:
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            needed = sum(spec.num_bundles * spec.bundle.get("CPU", 0.0) for spec in layout.pools.values())
            session.temp_dir = tempfile.mkdtemp(prefix="fapo-ray-", dir="/tmp")  # Ray's socket paths: <= 107 bytes
            reaper = RunReaper(remove_after=session.temp_dir)  # before ray.init: all of Ray descends from it
            children_before = {child.pid for child in psutil.Process().children()}
            try:
                ray.init(
                    address="local",
                    num_cpus=num_cpus if num_cpus is not None else max(os.cpu_count() or 1, math.ceil(needed)),
                    include_dashboard=False,
                    _temp_dir=session.temp_dir,
                    logging_level=logging.WARNING,
                )
            finally:
                # The processes a local Ray runs (GCS, raylet, monitors) are this process's new children.
                ray_processes = [p for p in psutil.Process().children() if p.pid not in children_before]
        _raise_on_sigterm()  # again: ray.init replaced it with one that exits with status 15
        if create_pools:
            for spec in layout.pools.values():
                session.pools[spec.name] = create_pool(spec, pool_timeout_s)
        yield session
    finally:
        try:
            _teardown(session, ray_processes)
        finally:
            if reaper is not None:
                reaper.close()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)


def _raise_on_sigterm():
    """Turn SIGTERM (and SIGHUP) into SystemExit in the main thread so the session's cleanup runs; returns the old
    SIGTERM handler."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGHUP, handler)
    return signal.signal(signal.SIGTERM, handler)


def _teardown(session: RaySession, ray_processes: list[psutil.Process]) -> None:
    # A second Ctrl-C or SIGTERM during cleanup is ignored so it cannot cut the cleanup short.
    in_main = threading.current_thread() is threading.main_thread()
    saved = {}
    if in_main:
        saved = {sig: signal.signal(sig, _ignore_during_teardown) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        session.close()
        # Ray's workers are children of the raylet: list them before stopping Ray re-parents them.
        spawned = _with_descendants(ray_processes)
        ray.shutdown()
        _reap(spawned)
        if session.temp_dir:
            shutil.rmtree(session.temp_dir, ignore_errors=True)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _ignore_during_teardown(signum, frame):
    logger.warning("signal %d received while tearing Ray down; finishing the teardown first", signum)


def _with_descendants(processes: list[psutil.Process]) -> list[psutil.Process]:
    found = {}
    for process in processes:
        with contextlib.suppress(psutil.Error):
            found[process.pid] = process
            found.update({child.pid: child for child in process.children(recursive=True)})
    return list(found.values())


def _reap(processes: list[psutil.Process]) -> None:
    """Wait for Ray's processes to exit; terminate, then kill, the ones that linger."""
    deadline = time.monotonic() + _PROCESS_EXIT_GRACE_S
    _, alive = psutil.wait_procs(processes, timeout=max(0.0, deadline - time.monotonic()) / 2)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(alive, timeout=_PROCESS_EXIT_GRACE_S / 2)
    for process in alive:
        logger.warning("killing Ray process %d (%s) that outlived shutdown", process.pid, process.name())
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(alive, timeout=2.0)
