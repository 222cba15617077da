"""One rank of the colocated policy: a Megatron actor shard plus a rollout engine replica on the same device.

The trainer drives a group of these (one per device, through cluster.WorkerGroup). Every rank takes part in
the actor's collectives; the ranks that host an engine (every `rollout.tp`-th rank) also generate, each for its
share of the prompts, and take the actor's weights after every update. Engines and the actor time-share the
device: every method below enters its phase through phases.RESIDENCY (the actor's kinds when
parallel.offload_actor, the engine's memory parts always), freeing first, then bringing back, so no second ordering
exists. Each phase's resident bytes form the memory ledger.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator, Sequence

import torch

from fapo_megatron.algo.batch import TrainBatch
from fapo_megatron.cluster.placement import EnginePlacement
from fapo_megatron.config import Config, from_dict
from fapo_megatron.data.sampler import prompt_shard
from fapo_megatron.data.templates import load_tokenizer
from fapo_megatron.engine_protocol import MEMORY_TAGS, Engine, Generation, SamplingParams
from fapo_megatron.megatron import platform
from fapo_megatron.phases import RESIDENCY, actor_holds


def build_rollout_engine(cfg: Config, hf_config: dict, tokenizer, *, rank: int, engine: EnginePlacement) -> Engine:
    """The policy's generation engine on the devices and port placement gave it (`engine`); it starts with the
    actor's weights after the first `sync_weights`."""
    rollout = cfg.rollout
    if rollout.backend == "sglang":
        from fapo_megatron.engines.sglang import SGLangEngine, SGLangServerArgs

        common = dict(
            tokenizer=tokenizer, bucket_mb=rollout.weight_sync_bucket_mb, request_timeout_s=rollout.request_timeout_s
        )
        if rollout.sglang_url:
            return SGLangEngine(url=rollout.sglang_url, tp_size=rollout.tp, **common)
        if not cfg.model.path:
            raise ValueError("rollout.backend=sglang needs model.path (an HF checkpoint the server loads)")
        server = SGLangServerArgs(
            model_path=cfg.model.path,
            tp_size=rollout.tp,
            mem_fraction_static=rollout.mem_fraction,
            port=engine.port,
            base_gpu_id=engine.base_gpu_id,
            random_seed=cfg.trainer.seed + rank,
            dtype=cfg.model.dtype,
            enable_deterministic_inference=rollout.deterministic_inference,
        )
        rank_devices = [torch.device("cuda", gpu) for gpu in engine.gpu_ids] if _device(cfg) == "cuda" else None
        return SGLangEngine(server=server, rank_devices=rank_devices, **common)
    from transformers import AutoConfig, AutoModelForCausalLM

    from fapo_megatron.engines.embedded import EmbeddedEngine

    if cfg.model.path:
        return EmbeddedEngine(cfg.model.path, tokenizer=tokenizer, device=_device(cfg), dtype=_dtype(cfg))
    fields = {k: v for k, v in hf_config.items() if k != "model_type"}
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(hf_config["model_type"], **fields))
    return EmbeddedEngine(model=model, tokenizer=tokenizer, device=_device(cfg), dtype=_dtype(cfg))


def _device(cfg: Config) -> str:
    return "cuda" if cfg.cluster.device == "cuda" else "cpu"


def _dtype(cfg: Config) -> torch.dtype:
    return getattr(torch, cfg.model.dtype)


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
        self.engine_ranks = engine_ranks(self.world_size, self.cfg.rollout.tp)
        self.engine: Engine | None = None
        self._engine_held: set[str] = set()
        self._enter("rollout")  # the actor leaves the device before the engine sizes its memory
        if self.rank in self.engine_ranks:
            self.engine = build_rollout_engine(
                self.cfg, self.actor.hf_config, load_tokenizer(self.cfg), rank=self.rank, engine=engine
            )
            self.engine.start()
            self._engine_held = set(MEMORY_TAGS)

    # ------------------------------------------------------------------------------------------ rollout

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Generation]:
        """This rank's engine samples its share of `prompts`; prompt_index refers to the full list."""
        shard = self._shard(len(prompts))
        with self._phase("rollout"):
            if not shard:
                return []
            generations = self.engine.generate(self._prompts(prompts, shard), self._shard_params(params, shard))
        for gen in generations:
            gen.prompt_index += shard.start
        return generations

    def generate_stream(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams
    ) -> Iterator[list[tuple[int, Generation]]]:
        """`generate`, reporting samples as the engine finishes them: chunks of (position, generation) where
        position is the sample's index in the step's prompt-major list (shards are contiguous, so it is the shard's
        first row plus the engine's own position). Run through `WorkerGroup.stream`, the trainer sees each chunk
        while this rank still generates; the samples are those `generate` gives."""
        shard = self._shard(len(prompts))
        first_row = shard.start * params.n
        with self._phase("rollout"):
            if not shard:
                return
            chunks = self.engine.generate_stream(self._prompts(prompts, shard), self._shard_params(params, shard))
            for chunk in chunks:
                for _, gen in chunk:
                    gen.prompt_index += shard.start
                yield [(first_row + position, gen) for position, gen in chunk]

    def _shard(self, num_prompts: int) -> range:
        """This rank's prompts (empty on ranks without an engine)."""
        if self.engine is None:
            return range(0)
        return prompt_shard(num_prompts, self.engine_ranks.index(self.rank), len(self.engine_ranks))

    @staticmethod
    def _prompts(prompts: Sequence[Sequence[int]], shard: range) -> list[list[int]]:
        return [list(prompts[i]) for i in shard]

    @staticmethod
    def _shard_params(params: SamplingParams, shard: range) -> SamplingParams:
        return dataclasses.replace(params, seed=None if params.seed is None else params.seed + shard.start)

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
            if self.engine is None:
                for _ in buckets:  # every rank takes part in the gathers
                    pass
            else:
                self.engine.update_weights(buckets)
        self._enter("rollout")
        return {"seconds": time.perf_counter() - start, "bytes": float(sum(sizes)), "buckets": float(len(sizes))}

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
