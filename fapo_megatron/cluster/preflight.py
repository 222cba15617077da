"""Preflight checks of a job's nodes before any expensive work, each failure naming the node and the check.

Run as one task per GPU (one per node on cpu) by tools/slurm/fapo.sbatch.in, or alone on a login node
(world of one). Every task runs the node-local checks, then an all-reduce across all tasks (NCCL on cuda,
gloo on cpu) proves the network, and the first task gathers and prints every node's failures.
Checks: `plan` (TP x PP x DP = devices, heads / KV heads / layers / FFN divisible by the parallel sizes),
`job` (Slurm gave the nodes the config needs), `gpus` (visible GPUs = cluster.devices_per_node), `disk` (free
space under trainer.output_dir), `paths` (model, tokenizer, GenRM, data readable), `allreduce`.
"""

from __future__ import annotations

import datetime
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from fapo_megatron.cluster.sizing import resolve_shape, uses_genrm_model
from fapo_megatron.cluster.slurm import job_num_nodes
from fapo_megatron.config import Config, ConfigError
from fapo_megatron.models.spec import ModelSpec


@dataclass(frozen=True)
class Failure:
    node: str
    check: str
    message: str

    def __str__(self) -> str:
        return f"[{self.node}] {self.check}: {self.message}"


@dataclass(frozen=True)
class Task:
    """Where this process sits in the preflight world (from Slurm's variables, or a world of one)."""

    rank: int
    world: int
    local_rank: int
    node: str

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Task:
        env = os.environ if env is None else env
        return cls(
            rank=int(env.get("SLURM_PROCID", 0)),
            world=int(env.get("SLURM_NTASKS", 1)),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            node=env.get("SLURMD_NODENAME") or socket.gethostname(),
        )


def check_plan(cfg: Config, node: str) -> list[Failure]:
    """Parallel sizes against the node size and the model shapes (HF config.json, else sizing.*_shape).

    TP x PP x DP = num_nodes x devices_per_node is already a config rule; `check_job` and `check_gpus` tie
    those two numbers to the nodes and GPUs Slurm actually gave the job.
    """
    failures = []
    par = cfg.parallel
    if par.tp > cfg.cluster.devices_per_node:
        failures.append(
            Failure(
                node,
                "plan",
                f"parallel.tp={par.tp} spans nodes (cluster.devices_per_node="
                f"{cfg.cluster.devices_per_node}); keep TP inside a node",
            )
        )
    policy = _shape_or_none(cfg.model.path, cfg.sizing.model_shape)
    if policy is not None:
        failures += _divisibility(policy, "parallel.tp", par.tp, node, megatron=True)
        if policy.num_layers % par.pp:
            failures.append(
                Failure(
                    node,
                    "plan",
                    f"{policy.name}: {policy.num_layers} layers do not split into parallel.pp={par.pp} stages",
                )
            )
        failures += _divisibility(policy, "rollout.tp", cfg.rollout.tp, node, megatron=False)
    if uses_genrm_model(cfg):
        genrm = _shape_or_none(cfg.genrm.model_path, cfg.sizing.genrm_shape)
        if genrm is not None:
            failures += _divisibility(genrm, "genrm.tp", cfg.genrm.tp, node, megatron=False)
    for key, tp in (("rollout.tp", cfg.rollout.tp), ("genrm.tp", cfg.genrm.tp)):
        if tp > cfg.cluster.devices_per_node:
            failures.append(
                Failure(node, "plan", f"{key}={tp} exceeds cluster.devices_per_node={cfg.cluster.devices_per_node}")
            )
    return failures


def _shape_or_none(path: str, fallback: str) -> ModelSpec | None:
    try:
        return resolve_shape(path, fallback, "shape")
    except ConfigError:
        return None  # a tiny random model, or a checkpoint not readable here: the paths check reports the latter


def _divisibility(shape: ModelSpec, key: str, tp: int, node: str, *, megatron: bool) -> list[Failure]:
    """Megatron splits heads and KV groups over TP; SGLang also allows replicating KV heads (tp % kv == 0)."""
    failures = []
    if shape.num_attention_heads % tp:
        message = f"{shape.name}: {shape.num_attention_heads} attention heads not divisible by {key}={tp}"
        failures.append(Failure(node, "plan", message))
    kv_ok = shape.num_query_groups % tp == 0 or (not megatron and tp % shape.num_query_groups == 0)
    if not kv_ok:
        failures.append(
            Failure(node, "plan", f"{shape.name}: {shape.num_query_groups} KV heads do not split over {key}={tp}")
        )
    if megatron and shape.ffn_hidden_size % tp:
        failures.append(
            Failure(node, "plan", f"{shape.name}: FFN size {shape.ffn_hidden_size} not divisible by {key}={tp}")
        )
    return failures


def check_job(cfg: Config, node: str, env: dict[str, str] | None = None) -> list[Failure]:
    """The Slurm allocation has the nodes the config asks for (skipped outside Slurm)."""
    env = os.environ if env is None else env
    if "SLURM_JOB_NUM_NODES" not in env:
        return []
    have, need = int(env["SLURM_JOB_NUM_NODES"]), job_num_nodes(cfg)
    if have != need:
        return [
            Failure(
                node,
                "job",
                f"the job has {have} nodes, the config needs {need} (cluster.num_nodes="
                f"{cfg.cluster.num_nodes} + GenRM pool)",
            )
        ]
    return []


def check_gpus(cfg: Config, node: str, visible: int | None = None) -> list[Failure]:
    """Every node sees exactly cluster.devices_per_node GPUs (cuda only)."""
    if cfg.cluster.device != "cuda":
        return []
    if visible is None:
        import torch

        visible = torch.cuda.device_count()
    if visible != cfg.cluster.devices_per_node:
        return [
            Failure(
                node,
                "gpus",
                f"{visible} GPUs visible (CUDA_VISIBLE_DEVICES="
                f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}), the config wants "
                f"cluster.devices_per_node={cfg.cluster.devices_per_node}",
            )
        ]
    return []


def check_disk(cfg: Config, node: str) -> list[Failure]:
    """Free space for checkpoints under trainer.output_dir (its nearest existing parent)."""
    target = Path(cfg.trainer.output_dir).resolve()
    while not target.exists():
        target = target.parent
    free_gb = shutil.disk_usage(target).free / 1e9
    if free_gb < cfg.slurm.min_free_disk_gb:
        return [
            Failure(
                node,
                "disk",
                f"{free_gb:.1f} GB free under {target}, slurm.min_free_disk_gb="
                f"{cfg.slurm.min_free_disk_gb:g} needed for checkpoints",
            )
        ]
    return []


def check_paths(cfg: Config, node: str) -> list[Failure]:
    """Every file and folder the run reads exists here and is readable."""
    wanted = [
        ("model.path", cfg.model.path, "config.json"),
        ("model.tokenizer", cfg.model.tokenizer, ""),
        ("model.megatron_checkpoint", cfg.model.megatron_checkpoint, ""),
        ("data.train_path", cfg.data.train_path, ""),
        ("data.val_path", cfg.data.val_path, ""),
    ]
    if uses_genrm_model(cfg):
        wanted.append(("genrm.model_path", cfg.genrm.model_path, "config.json"))
    failures = []
    for key, path, inside in wanted:
        if not path:
            continue
        target = Path(path) / inside if inside else Path(path)
        if not target.exists():
            failures.append(Failure(node, "paths", f"{key}: {target} does not exist on this node"))
        elif not os.access(target, os.R_OK):
            failures.append(Failure(node, "paths", f"{key}: {target} is not readable"))
    return failures


def local_checks(cfg: Config, task: Task) -> list[Failure]:
    """The checks one task per node runs (the first task of each node); the plan check only on rank 0."""
    failures = check_plan(cfg, task.node) + check_job(cfg, task.node) if task.rank == 0 else []
    if task.local_rank == 0:
        failures += check_gpus(cfg, task.node) + check_disk(cfg, task.node) + check_paths(cfg, task.node)
    return failures


def allreduce_check(
    cfg: Config, task: Task, master_addr: str, master_port: int, timeout_s: float = 300.0
) -> tuple[list[Failure], list[Failure], str]:
    """All-reduce across every task and gather all tasks' failures on rank 0.

    Returns (all failures as rank 0 sees them, or this task's own when the collective broke; the local
    all-reduce failures; a timing line).
    """
    import torch
    import torch.distributed as dist

    cuda = cfg.cluster.device == "cuda"
    own = local_checks(cfg, task)
    if cuda:
        torch.cuda.set_device(task.local_rank)
    try:
        dist.init_process_group(
            backend="cpu:gloo,cuda:nccl" if cuda else "gloo",
            init_method=f"tcp://{master_addr}:{master_port}",
            rank=task.rank,
            world_size=task.world,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    except Exception as err:  # noqa: BLE001 - any rendezvous error is this node's preflight failure
        broken = [Failure(task.node, "allreduce", f"rendezvous at {master_addr}:{master_port} failed: {err}")]
        return own + broken, broken, ""
    try:
        device = torch.device("cuda", task.local_rank) if cuda else torch.device("cpu")
        numel = (256 if cuda else 1) * 2**20 // 4
        dist.all_reduce(torch.ones(1, device=device))  # warm-up: NCCL builds its communicator on first use
        payload = torch.full((numel,), float(task.rank + 1), device=device)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        dist.all_reduce(payload)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        expected = task.world * (task.world + 1) / 2
        bad = []
        if not torch.all(payload == expected):
            bad = [Failure(task.node, "allreduce", f"rank {task.rank}: sum {payload[0].item()} != {expected}")]
        gathered: list[list[Failure]] = [[] for _ in range(task.world)]
        dist.all_gather_object(gathered, own + bad)
        bus_gbps = 2 * (task.world - 1) / task.world * numel * 4 / seconds / 1e9
        timing = (
            f"all-reduce of {numel * 4 / 2**20:.0f} MiB over {task.world} tasks: {seconds * 1e3:.1f} ms, "
            f"bus {bus_gbps:.2f} GB/s ({'nccl' if cuda else 'gloo'})"
        )
        return [failure for part in gathered for failure in part], bad, timing
    finally:
        dist.destroy_process_group()


def run_preflight(cfg: Config, master_addr: str, master_port: int, task: Task | None = None) -> int:
    """The `fapo-megatron slurm preflight` body: 0 when every check passed everywhere, else 1."""
    task = task or Task.from_env()
    failures, own_collective, timing = allreduce_check(cfg, task, master_addr, master_port)
    if task.rank == 0 or own_collective:
        for failure in failures:
            print(f"preflight FAILED {failure}", flush=True)
    if task.rank == 0:
        if timing:
            print(f"preflight: {timing}", flush=True)
        print("preflight: all checks passed" if not failures else f"preflight: {len(failures)} failure(s)", flush=True)
    return 1 if failures else 0
