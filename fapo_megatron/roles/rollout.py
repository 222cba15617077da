"""The policy's rollout engines: how one is built, its share of a step's prompts, and the worker that hosts one on a
pool of its own.

Colocated (`rollout.placement=colocated`) every `rollout.tp`-th PolicyWorker hosts an engine replica beside its actor
shard; separate, each replica is a RolloutWorker on `cluster.rollout_devices`, which takes the actor's weights over a
side process group (actor rank 0 broadcasts, every RolloutWorker receives; engines/weight_sync.send_buckets) and
holds all its memory all the time (nothing else uses its devices). Both generate through `EngineShard`, so the
prompts, seeds and sample order of a replica are the same in either placement.
"""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Iterator, Sequence

import torch

from fapo_megatron.cluster.placement import EnginePlacement
from fapo_megatron.config import Config, from_dict
from fapo_megatron.data.sampler import prompt_shard
from fapo_megatron.data.templates import load_tokenizer
from fapo_megatron.engine_protocol import Engine, Generation, SamplingParams


def build_rollout_engine(
    cfg: Config, hf_config: dict, tokenizer, *, rank: int, engine: EnginePlacement, weight_master=None
) -> Engine:
    """The policy's generation engine on the devices and port placement gave it (`engine`); it starts with the
    actor's weights after the first weight push. `weight_master` = (address, port): an SGLang server joins a side
    group there (its host as rank 0) for the push (separate pools); None: CUDA IPC from this process."""
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
        if weight_master is not None:
            return SGLangEngine(
                server=server,
                transport="distributed",
                distributed_master=weight_master,
                distributed_backend=_backend(cfg),
                distributed_device=_device(cfg),
                **common,
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


def _backend(cfg: Config) -> str:
    """The side group's backend for weight pushes: NCCL between GPUs, gloo on CPU."""
    return "nccl" if cfg.cluster.device == "cuda" else "gloo"


def _dtype(cfg: Config) -> torch.dtype:
    return getattr(torch, cfg.model.dtype)


def weight_device(cfg: Config) -> torch.device:
    """Where pushed tensors travel on the side group (this process's GPU, or the host)."""
    return torch.device("cuda", torch.cuda.current_device()) if cfg.cluster.device == "cuda" else torch.device("cpu")


def join_weight_group(cfg: Config, address: str, port: int, world_size: int, rank: int):
    """The side group of weight pushes to a separate rollout pool: actor rank 0 is its rank 0, RolloutWorker r its
    rank r + 1 (NCCL on GPU, gloo on CPU)."""
    from fapo_megatron.engines.weight_sync import init_custom_process_group

    return init_custom_process_group(
        backend=_backend(cfg),
        init_method=f"tcp://{address}:{port}",
        world_size=world_size,
        rank=rank,
        group_name="fapo_rollout_weights",
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


@dataclasses.dataclass
class EngineShard:
    """Replica `index` of `count`: it samples its contiguous share of a step's prompts, seeded by the share's first
    prompt, and reports prompt indices into the full list."""

    engine: Engine
    index: int
    count: int

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Generation]:
        shard = prompt_shard(len(prompts), self.index, self.count)
        if not shard:
            return []
        generations = self.engine.generate(_take(prompts, shard), _shard_params(params, shard))
        for gen in generations:
            gen.prompt_index += shard.start
        return generations

    def generate_stream(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams
    ) -> Iterator[list[tuple[int, Generation]]]:
        """`generate` as the engine finishes samples: chunks of (position, generation) where position is the
        sample's index in the step's prompt-major list (the share's first row plus the engine's own position)."""
        shard = prompt_shard(len(prompts), self.index, self.count)
        if not shard:
            return
        first_row = shard.start * params.n
        for chunk in self.engine.generate_stream(_take(prompts, shard), _shard_params(params, shard)):
            for _, gen in chunk:
                gen.prompt_index += shard.start
            yield [(first_row + position, gen) for position, gen in chunk]


def _take(prompts: Sequence[Sequence[int]], shard: range) -> list[list[int]]:
    return [list(prompts[i]) for i in shard]


def _shard_params(params: SamplingParams, shard: range) -> SamplingParams:
    return dataclasses.replace(params, seed=None if params.seed is None else params.seed + shard.start)


class RolloutWorker:
    """One rollout engine replica on the rollout pool (`rollout.placement=separate`), built from its EnginePlacement.

    Ray runs its calls one at a time, in order: a weight push asked while it generates is taken once that
    generation is done (trainer.off_policy_steps=1 relies on it)."""

    def __init__(self, cfg_dict: dict, engine: EnginePlacement):
        from fapo_megatron.dist_env import DistEnv
        from fapo_megatron.megatron.actor import policy_hf_config

        self.cfg = from_dict(Config, cfg_dict)
        if self.cfg.cluster.device == "cuda":
            torch.cuda.set_device(DistEnv.from_environ().local_rank)  # the replica's first GPU (workers.py)
        torch.manual_seed(self.cfg.trainer.seed)
        # An SGLang server runs on this worker's node and joins this worker's side group for each push.
        weight_master = ("127.0.0.1", free_port()) if self.cfg.rollout.backend == "sglang" else None
        num_replicas = self.cfg.cluster.rollout_devices // self.cfg.rollout.tp
        self.engine = build_rollout_engine(
            self.cfg,
            policy_hf_config(self.cfg),
            load_tokenizer(self.cfg),
            rank=engine.bundle,
            engine=engine,
            weight_master=weight_master,
        )
        self.engine.start()
        self.shard = EngineShard(self.engine, engine.replica, num_replicas)
        self._group = None

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Generation]:
        return self.shard.generate(prompts, params)

    def generate_stream(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams
    ) -> Iterator[list[tuple[int, Generation]]]:
        yield from self.shard.generate_stream(prompts, params)

    def join_weight_broadcast(self, address: str, port: int, world_size: int, rank: int) -> None:
        """Join the side group actor rank 0 broadcasts weights on (rank 0 there; this worker is `rank`)."""
        self._group = join_weight_group(self.cfg, address, port, world_size, rank)

    def receive_weights(self) -> int:
        """Take one weight push from actor rank 0 into the engine, bucket by bucket as it arrives (the engine's own
        update_weights: the embedded engine copies, an SGLang engine forwards to its server over its
        DistributedTransport); returns the engine's weight version after it."""
        from fapo_megatron.engines.weight_sync import receive_buckets

        if self._group is None:
            raise RuntimeError("RolloutWorker.receive_weights before join_weight_broadcast")
        self.engine.update_weights(receive_buckets(self._group, weight_device(self.cfg)))
        return int(self.engine.weight_version)

    def close(self) -> None:
        self.engine.shutdown()
        if self._group is not None:
            torch.distributed.destroy_process_group(self._group)
            self._group = None
