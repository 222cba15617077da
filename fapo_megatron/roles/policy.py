"""One rank of the policy: a Megatron actor shard plus, colocated, a rollout engine replica on the same device.

The trainer drives a group of these (one per device, through cluster.WorkerGroup). Every rank takes part in
the actor's collectives; colocated, the ranks that host an engine (every `rollout.tp`-th rank) also generate, each
for its share of the prompts, and take the actor's weights after every update. With `rollout.placement=separate`
no rank hosts an engine: rank 0 broadcasts each pushed bucket to the RolloutWorkers (roles/rollout.py) instead.
Engines and the actor time-share the device: every method below enters its phase through phases.RESIDENCY (the
actor's kinds when parallel.offload_actor, the engine's memory parts always; a separate pool's engines are not
here, so only the actor's column applies), freeing first, then bringing back, so no second ordering exists. Each
phase's resident bytes form the memory ledger.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence

import torch

from fapo_megatron.algo.batch import TrainBatch
from fapo_megatron.cluster.placement import EnginePlacement
from fapo_megatron.config import Config, from_dict
from fapo_megatron.data.templates import load_tokenizer
from fapo_megatron.engine_protocol import MEMORY_TAGS, Engine, Generation, SamplingParams
from fapo_megatron.engines.weight_sync import send_buckets
from fapo_megatron.megatron import platform
from fapo_megatron.phases import RESIDENCY, actor_holds
from fapo_megatron.roles.rollout import EngineShard, build_rollout_engine, free_port, join_weight_group, weight_device


def engine_ranks(world_size: int, rollout_tp: int) -> list[int]:
    """Ranks hosting a rollout engine: the first rank of every `rollout_tp` consecutive devices."""
    return list(range(0, world_size, rollout_tp))


class PolicyWorker:
    """Built inside a Ray worker whose environment holds the torch.distributed rendezvous (dist_env.py)."""

    def __init__(self, cfg_dict: dict, engine: EnginePlacement | None = None):
        from fapo_megatron.dist_env import init_distributed_from_env
        from fapo_megatron.megatron.actor import MegatronActor

        self.cfg = from_dict(Config, cfg_dict)
        dist_env = init_distributed_from_env()
        self.rank, self.world_size = dist_env.rank, dist_env.world_size
        torch.manual_seed(self.cfg.trainer.seed)
        self.actor = MegatronActor(self.cfg)
        self._ledger: dict[str, float] = {}
        self.master_addr = dist_env.master_addr
        colocated = self.cfg.rollout.placement == "colocated"
        self.engine_ranks = engine_ranks(self.world_size, self.cfg.rollout.tp) if colocated else []
        self.engine: Engine | None = None
        self.shard: EngineShard | None = None
        self._engine_held: set[str] = set()
        self._weight_group = None
        """Separate rollout pool, rank 0: the side group the pushed buckets are broadcast on."""
        self._enter("rollout")  # the actor leaves the device before the engine sizes its memory
        if self.rank in self.engine_ranks:
            self.engine = build_rollout_engine(
                self.cfg, self.actor.hf_config, load_tokenizer(self.cfg), rank=self.rank, engine=engine
            )
            self.engine.start()
            self._engine_held = set(MEMORY_TAGS)
            self.shard = EngineShard(self.engine, self.engine_ranks.index(self.rank), len(self.engine_ranks))

    # ------------------------------------------------------------------------------------------ rollout

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Generation]:
        """This rank's engine samples its share of `prompts`; prompt_index refers to the full list."""
        with self._phase("rollout"):
            return [] if self.shard is None else self.shard.generate(prompts, params)

    def generate_stream(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams
    ) -> Iterator[list[tuple[int, Generation]]]:
        """`generate`, reporting samples as the engine finishes them (EngineShard.generate_stream). Run through
        `WorkerGroup.stream`, the trainer sees each chunk while this rank still generates."""
        with self._phase("rollout"):
            if self.shard is not None:
                yield from self.shard.generate_stream(prompts, params)

    def enter_genrm(self) -> None:
        """After the rollout: the engine gives its device memory back for the GenRM phase (the judge runs elsewhere:
        trainer, GenRM workers), the actor off the device; the ledger records what the actor held meanwhile."""
        with self._phase("genrm"):
            pass

    # ------------------------------------------------------------------------------------------ actor

    def compute_logprobs(self, batch: TrainBatch) -> tuple[torch.Tensor, torch.Tensor]:
        with self._phase("logprobs"):
            return self.actor.compute_logprobs(batch, self.cfg.rollout.temperature)

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        with self._phase("update"):
            return self.actor.train_step(batch)

    def sync_weights(self) -> dict[str, float]:
        """Push the actor's weights (HF names, gathered over TP/PP, in buckets) into this rank's engine, then hand
        the device to the engine for the next rollout (the actor offloads when parallel.offload_actor)."""
        start = time.perf_counter()
        sizes = []

        def counted(buckets):
            for bucket in buckets:
                sizes.append(sum(t.numel() * t.element_size() for _, t in bucket))
                yield bucket

        with self._phase("weight_sync"):  # the engine has its weights back, the actor its parameters only
            held = self.actor.resident_bytes()
            self._ledger["memory/weight_sync/actor_grads_optimizer_bytes"] = float(held["grads"] + held["optimizer"])
            buckets = counted(self.actor.export_hf_weights(self.cfg.rollout.weight_sync_bucket_mb << 20))
            if self._weight_group is not None:
                send_buckets(buckets, self._weight_group, weight_device(self.cfg))
            elif self.engine is not None:
                self.engine.update_weights(buckets)
            else:
                for _ in buckets:  # every rank takes part in the gathers
                    pass
        self._enter("rollout")
        return {"seconds": time.perf_counter() - start, "bytes": float(sum(sizes)), "buckets": float(len(sizes))}

    def weight_broadcast_address(self) -> tuple[str, int]:
        """Rank 0: where the rollout workers meet it for weight pushes (its node, a free port there)."""
        return self.master_addr, free_port()

    def join_weight_broadcast(self, address: str, port: int, world_size: int) -> None:
        """Rank 0, separate rollout pool: join the side group as its rank 0 (every RolloutWorker joins beside)."""
        self._weight_group = join_weight_group(self.cfg, address, port, world_size, rank=0)

    def save(self, directory: str, step: int, extra_state: dict) -> str:
        """Checkpoint in the table's checkpoint phase (no gradients; the engine keeps only its weights), then back
        to the phase the worker was in."""
        before = self.phase
        self._enter("checkpoint")
        try:
            return str(self.actor.save(directory, step, extra_state))
        finally:
            self._enter(before)

    def finish_checkpoint(self, blocking: bool) -> str | None:
        """Publish a background save once every rank has written it (None: none pending, or still writing)."""
        folder = self.actor.finish_checkpoint(blocking=blocking)
        return None if folder is None else str(folder)

    def load(self, directory: str) -> dict:
        """Before the first weight push (the engine released): the checkpoint is read into every state tensor, and
        the push's phase offloads what it does not hold."""
        self.actor.onload()
        return self.actor.load(directory)

    # ------------------------------------------------------------------------------------------ memory

    @contextlib.contextmanager
    def _phase(self, phase: str):
        """Run a phase with the residency it needs (phases.RESIDENCY); the ledger gets what the actor held at its end
        (Adam's moments exist once the first update has run) and, on CUDA, the allocator's peak during it."""
        self._enter(phase)
        if not platform.on_cpu():
            torch.cuda.reset_peak_memory_stats()
        yield
        self._ledger[f"memory/{phase}/actor_bytes"] = float(sum(self.actor.resident_bytes().values()))
        if not platform.on_cpu():
            self._ledger[f"memory/{phase}/device_peak_bytes"] = float(torch.cuda.max_memory_allocated())

    def _enter(self, phase: str) -> None:
        """Move to `phase`'s residency: the actor's surplus kinds and the engine's surplus parts leave first (the
        offload empties the allocator cache), then the engine and the actor take back what the phase needs."""
        actor = actor_holds(phase, self.cfg.parallel.offload_actor)
        engine = [tag for tag in MEMORY_TAGS if tag in RESIDENCY[phase].rollout]
        resident = self.actor.resident_kinds
        self.actor.offload(tuple(k for k in resident if k not in actor))
        if self.engine is not None:
            surplus = [tag for tag in MEMORY_TAGS if tag in self._engine_held and tag not in engine]
            missing = [tag for tag in engine if tag not in self._engine_held]
            if surplus:
                self.engine.release_memory(surplus)
            if missing:
                self.engine.resume_memory(missing)
            self._engine_held = set(engine)
        self.actor.onload(tuple(k for k in actor if k not in resident))
        self.phase = phase

    def memory_ledger(self) -> dict[str, float]:
        """What the actor held on the device per phase since the last call (`memory/<phase>/actor_bytes`; on CUDA
        also the allocator's peak up to the phase's start, `memory/<phase>/device_peak_bytes`), then reset."""
        ledger, self._ledger = self._ledger, {}
        return ledger

    def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
        self.actor.close()
