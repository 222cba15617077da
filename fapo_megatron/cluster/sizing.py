"""Per-GPU memory estimate of a run's parallel plan, phase by phase, before a job is submitted.

A colocated step time-shares each GPU (docs/ARCHITECTURE.md): what each role holds in each phase is
phases.RESIDENCY (the rollout engine awake, then the GenRM engine, then the Megatron actor trains, then the
weight push; whoever is asleep has released its GPU memory: SGLang `release_memory_occupation`, Megatron offloads
to host). So the plan fits when the largest phase fits. Terms: GB = 1e9 bytes; N = parameter count; t, p, d =
tensor-, pipeline- and data-parallel sizes; T = tokens of the largest micro-batch: micro_batch_size x (max prompt +
max response tokens), or with packing max(parallel.max_tokens_per_micro_batch, one full-length row).

Actor training, first pipeline stage (the one with the most activations in flight under 1F1B):
  params   N_stage/t x 2 bytes (bf16; 4 for fp32)
  grads    N_stage/t x 4 bytes (Megatron's fp32 main-grad buffer; the parameter dtype without grad_reduce_in_fp32)
  optimizer N_stage/t x 12 bytes (fp32 master + Adam m, v; m, v in their dtypes with the precision-aware
           optimizer), divided by d with the distributed optimizer, x (1 - optim.cpu_offload_fraction)
  activations per layer per token, bf16 (flash/SDPA attention, no dropout):
    replicated over t unless sequence parallel: 4h (two norm inputs, qkv input, fc1 input)
    split over t: q + k + v + attention output (2 h_q + 2 kv_dim) and SwiGLU 4 ffn (gate, up, silu, fc2 input)
    1F1B keeps p micro-batches of L/p layers in flight on stage 0, i.e. L layers' worth;
    full recompute (megatron's uniform method, chunks of recompute_num_layers = k layers) keeps each chunk's
    input (h, /t with sequence parallel) plus one chunk's working set
  logits   T x vocab/t x 4 bytes x 2 (fp32 logits and their gradient, last stage); with logprob_chunk_tokens C:
           T x vocab/t x 2 x param bytes (logits and gradient) + C x vocab/t x 4 bytes x 2 (one chunk's work)
Weight sync: the actor's parameters and the engine's weights are both resident, plus two buckets.
Engines (SGLang): the static pool is mem_fraction x GPU; weights N/tp x 2 bytes; the rest is KV cache of
  2 x layers x kv_heads/tp x head_dim x 2 bytes per token (KV heads are replicated when tp > kv_heads).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from fapo_megatron.config import Config, ConfigError
from fapo_megatron.models.registry import recompute_settings
from fapo_megatron.models.spec import ModelSpec, UnsupportedModelError, model_spec
from fapo_megatron.phases import RESIDENCY, actor_holds

GB = 1e9
BF16 = 2
FP32 = 4


_SHAPE_CONFIGS = {
    "qwen2.5-math-7b": {
        "architectures": ["Qwen2ForCausalLM"],
        "hidden_size": 3584,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "intermediate_size": 18944,
        "vocab_size": 152064,
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
    },
    "qwen2.5-32b": {
        "architectures": ["Qwen2ForCausalLM"],
        "hidden_size": 5120,
        "num_hidden_layers": 64,
        "num_attention_heads": 40,
        "num_key_value_heads": 8,
        "intermediate_size": 27648,
        "vocab_size": 152064,
        "max_position_embeddings": 131072,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
    },
    "qwen3-4b": {
        "architectures": ["Qwen3ForCausalLM"],
        "hidden_size": 2560,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "intermediate_size": 9728,
        "vocab_size": 151936,
        "max_position_embeddings": 40960,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
    },
}
"""Keys of the public HF config.json files of these checkpoints (no download at run time)."""
SHAPES: dict[str, ModelSpec] = {name: model_spec(raw, name) for name, raw in _SHAPE_CONFIGS.items()}


def resolve_shape(path: str, fallback: str, what: str) -> ModelSpec:
    """Spec of `path`/config.json when readable, else the built-in `fallback`; `what` names the config key."""
    config_json = Path(path) / "config.json" if path else None
    if config_json is not None and config_json.is_file():
        try:
            return model_spec(config_json)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{config_json}: not valid JSON: {err}") from None
        except UnsupportedModelError as err:
            raise ConfigError(f"{config_json}: {err}") from None
    if fallback in SHAPES:
        return SHAPES[fallback]
    where = f"{config_json} is not readable and " if config_json is not None else ""
    raise ConfigError(
        f"{what}: {where}no built-in shape {fallback!r}; set sizing.{what.split('.')[-1]} to one of {sorted(SHAPES)}"
    )


@dataclass
class Phase:
    """One time slice of a GPU: what is resident while that role is awake."""

    name: str
    lines: list[tuple[str, float, str]] = field(default_factory=list)
    """(component, GB, how it was computed)."""

    def add(self, component: str, num_bytes: float, note: str) -> None:
        self.lines.append((component, num_bytes / GB, note))

    @property
    def total_gb(self) -> float:
        return sum(gb for _, gb, _ in self.lines)


@dataclass
class SizingReport:
    phases: list[Phase]
    gpu_memory_gb: float
    problems: list[str]
    """Empty when every phase fits and every engine has room for at least one full-length sequence."""

    @property
    def peak_gb(self) -> float:
        return max(phase.total_gb for phase in self.phases)

    @property
    def fits(self) -> bool:
        return not self.problems


def estimate(cfg: Config, policy: ModelSpec, genrm: ModelSpec | None) -> SizingReport:
    """Per-GPU memory of each phase of `cfg`'s plan; `genrm` None when no GenRM model runs on the cluster."""
    gpu = cfg.sizing.gpu_memory_gb * GB
    phases = [_train_phase(cfg, policy)]
    problems: list[str] = []
    seq = cfg.rollout.max_prompt_tokens + cfg.rollout.max_response_tokens
    kinds = actor_kind_bytes(cfg, policy)
    colocated = cfg.rollout.placement == "colocated"
    name = "rollout" if colocated else "rollout (own pool)"
    rollout = _engine_phase(name, policy, cfg.rollout.tp, cfg.rollout.mem_fraction, seq, cfg, problems)
    if colocated:
        _add_actor(rollout, kinds, "rollout", cfg, label="actor ")  # nothing with parallel.offload_actor
    else:  # the engine's GPUs also hold the bucket a push is received into
        rollout.add("bucket", cfg.rollout.weight_sync_bucket_mb * 2**20, "one received bucket")
    phases.append(rollout)
    phases.append(_weight_sync_phase(cfg, policy))
    if genrm is not None:
        # The judge reads the problem and the whole solution, then writes up to max_new_tokens.
        genrm_seq = seq + cfg.genrm.max_new_tokens
        name = "genrm" if cfg.genrm.placement == "colocated" else "genrm (own pool)"
        phase = _engine_phase(name, genrm, cfg.genrm.tp, cfg.genrm.mem_fraction, genrm_seq, cfg, problems)
        if cfg.genrm.placement == "colocated":
            _add_actor(phase, kinds, "genrm", cfg, label="actor ")
        phases.append(phase)
    for phase in phases:
        phase.add("runtime overhead", cfg.sizing.runtime_overhead_gb * GB, "sizing.runtime_overhead_gb")
        if phase.total_gb * GB > gpu:
            problems.append(
                f"{phase.name} phase needs {phase.total_gb:.1f} GB per GPU, more than sizing.gpu_memory_gb="
                f"{cfg.sizing.gpu_memory_gb:g}"
            )
    return SizingReport(phases=phases, gpu_memory_gb=cfg.sizing.gpu_memory_gb, problems=problems)


def actor_kind_bytes(cfg: Config, shape: ModelSpec) -> dict[str, tuple[float, str]]:
    """Bytes (and how they were computed) of each of the actor's kinds on one rank of the first pipeline stage."""
    par, t, p, d = cfg.parallel, cfg.parallel.tp, cfg.parallel.pp, cfg.dp
    stage_params = math.ceil(shape.num_layers / p) * shape.layer_params + shape.embedding_params
    if p == 1:
        stage_params += shape.hidden_size + (0 if shape.tie_embeddings else shape.embedding_params)  # final norm, head
    per_rank = stage_params / t
    param_bytes = FP32 if cfg.model.dtype == "float32" else BF16
    grad_bytes = FP32 if par.grad_reduce_in_fp32 else param_bytes
    return {
        "params": (per_rank * param_bytes, f"{stage_params / 1e9:.2f}B stage params / t={t} x {param_bytes} B"),
        "grads": (per_rank * grad_bytes, f"{grad_bytes} B/param gradient buffer"),
        "optimizer": _optimizer_bytes(cfg, per_rank, d),
    }


def predicted_actor_ledger(cfg: Config, shape: ModelSpec) -> dict[str, float]:
    """What the memory ledger (`memory/<phase>/actor_bytes`) should read on the largest rank, phase by phase: the
    kinds phases.RESIDENCY puts on the device, priced as above."""
    kinds = actor_kind_bytes(cfg, shape)
    offload = cfg.parallel.offload_actor
    return {phase: sum(kinds[k][0] for k in actor_holds(phase, offload)) for phase in LEDGER_PHASES}


LEDGER_PHASES = ("rollout", "genrm", "logprobs", "update", "weight_sync")
"""The phases the trainer's ledger reports."""


def _add_actor(phase: Phase, kinds: dict[str, tuple[float, str]], table_phase: str, cfg: Config, label="") -> None:
    for kind in actor_holds(table_phase, cfg.parallel.offload_actor):
        num_bytes, note = kinds[kind]
        phase.add(f"{label}{kind}", num_bytes, note)


def _train_phase(cfg: Config, shape: ModelSpec) -> Phase:
    par, t, p = cfg.parallel, cfg.parallel.tp, cfg.parallel.pp
    phase = Phase("actor train")
    _add_actor(phase, actor_kind_bytes(cfg, shape), "update", cfg)
    row = cfg.rollout.max_prompt_tokens + cfg.rollout.max_response_tokens
    # packed: a micro-batch holds up to its token budget, and a longer row is a micro-batch of its own
    tokens = max(par.max_tokens_per_micro_batch, row) if par.max_tokens_per_micro_batch else par.micro_batch_size * row
    sp_div = t if par.sequence_parallel else 1
    replicated = 4 * shape.hidden_size / sp_div
    split = (2 * shape.q_dim + 2 * shape.kv_dim + 4 * shape.ffn_hidden_size) / t
    layer_bytes = BF16 * (replicated + split) * tokens
    # The recompute fields the actor hands megatron-core (models.registry), not the YAML's wish.
    settings = recompute_settings(par.recompute, par.recompute_num_layers, math.ceil(shape.num_layers / p))
    if settings["recompute_granularity"] == "full":
        chunk = settings["recompute_num_layers"]
        kept = BF16 * shape.hidden_size / sp_div * tokens * math.ceil(shape.num_layers / chunk)
        note = f"full recompute: {math.ceil(shape.num_layers / chunk)} chunk inputs + {chunk} layer(s), T={tokens}"
        phase.add("activations", kept + layer_bytes * chunk, note)
    else:
        note = f"{par.recompute} recompute: {shape.num_layers} layers, T={tokens}"
        phase.add("activations", layer_bytes * shape.num_layers, note)
    chunk = min(par.logprob_chunk_tokens, tokens)
    if chunk:
        param_bytes = FP32 if cfg.model.dtype == "float32" else BF16
        logits = tokens * shape.vocab_size / t * param_bytes * 2 + chunk * shape.vocab_size / t * FP32 * 2
        phase.add("logits", logits, f"logits + grad in model dtype, fp32 work of {chunk}-token chunks, vocab / t")
    else:
        phase.add("logits", tokens * shape.vocab_size / t * FP32 * 2, "fp32 logits + grad, vocab / t")
    return phase


def _optimizer_bytes(cfg: Config, per_rank: float, d: int) -> tuple[float, str]:
    """Adam's state on one GPU: fp32 master weights (the parameters themselves in fp32) and moments m, v in their
    dtypes (fp32 unless the precision-aware optimizer says otherwise), sharded over DP with the distributed
    optimizer, less the share megatron's hybrid optimizer keeps on the host."""
    optim = cfg.optim
    master = 0 if cfg.model.dtype == "float32" else FP32
    moments = sum(_DTYPE_BYTES[dtype] for dtype in (optim.exp_avg_dtype, optim.exp_avg_sq_dtype))
    shards = d if cfg.parallel.use_distributed_optimizer else 1
    on_gpu = 1.0 - optim.cpu_offload_fraction
    note = f"{master + moments} B/param Adam state / {shards} dp shards"
    if optim.cpu_offload_fraction:
        note += f" x {on_gpu:g} left on the GPU (optim.cpu_offload_fraction={optim.cpu_offload_fraction:g})"
    return per_rank * (master + moments) / shards * on_gpu, note


_DTYPE_BYTES = {"float32": FP32, "bfloat16": BF16, "float16": BF16}


def _weight_sync_phase(cfg: Config, shape: ModelSpec) -> Phase:
    """What phases.RESIDENCY holds during the push: the actor's parameters (gradients and optimizer state
    offloaded) and, colocated, the engine's weights (its KV cache and graphs still released), plus the buckets in
    flight."""
    phase = Phase("weight sync")
    _add_actor(phase, actor_kind_bytes(cfg, shape), "weight_sync", cfg, label="actor ")
    if "weights" in RESIDENCY["weight_sync"].rollout and cfg.rollout.placement == "colocated":
        phase.add("engine weights", shape.num_params / cfg.rollout.tp * BF16, f"bf16 / rollout tp={cfg.rollout.tp}")
    phase.add("bucket", 2 * cfg.rollout.weight_sync_bucket_mb * 2**20, "gathered HF-layout bucket + its copy")
    return phase


def _engine_phase(name, shape: ModelSpec, tp: int, mem_fraction: float, seq: int, cfg: Config, problems) -> Phase:
    gpu = cfg.sizing.gpu_memory_gb * GB
    phase = Phase(name)
    pool = mem_fraction * gpu
    weights = shape.num_params / tp * BF16
    kv_heads_per_rank = max(1, shape.num_query_groups // tp)
    kv_per_token = 2 * shape.num_layers * kv_heads_per_rank * shape.head_dim * BF16
    kv = max(pool - weights, 0.0)
    phase.add(f"{shape.name} weights", weights, f"{shape.num_params / 1e9:.2f}B params / tp={tp} bf16")
    full_sequences = kv / kv_per_token / seq
    phase.add(
        "KV cache",
        kv,
        f"pool {mem_fraction:g} x GPU; {kv / kv_per_token / 1e3:.0f}k tokens = "
        f"{full_sequences:.1f} x {seq}-token sequences",
    )
    if full_sequences < 1:
        problems.append(
            f"{name} engine: {mem_fraction:g} x {cfg.sizing.gpu_memory_gb:g} GB leaves {kv / GB:.1f} GB of KV cache "
            f"after {weights / GB:.1f} GB of weights, not enough for one {seq}-token sequence; raise its tp or "
            f"mem_fraction"
        )
    return phase


def format_report(report: SizingReport) -> str:
    """The breakdown table `fapo-megatron slurm size` prints."""
    rows = [f"{'phase':<18} {'component':<26} {'GB/GPU':>8}  how"]
    for phase in report.phases:
        for component, gb, note in phase.lines:
            rows.append(f"{phase.name:<18} {component:<26} {gb:>8.1f}  {note}")
        rows.append(f"{phase.name:<18} {'= total':<26} {phase.total_gb:>8.1f}")
    verdict = "fits" if report.fits else "DOES NOT FIT"
    rows.append(f"peak {report.peak_gb:.1f} GB of {report.gpu_memory_gb:g} GB per GPU: {verdict}")
    rows.extend(f"  problem: {problem}" for problem in report.problems)
    return "\n".join(rows)


def estimate_for_config(cfg: Config) -> SizingReport:
    """Resolve the shapes `cfg` names (config.json first, then sizing.*_shape) and estimate."""
    policy = resolve_shape(cfg.model.path, cfg.sizing.model_shape, "sizing.model_shape")
    genrm = None
    if uses_genrm_model(cfg):
        genrm = resolve_shape(cfg.genrm.model_path, cfg.sizing.genrm_shape, "sizing.genrm_shape")
    return estimate(cfg, policy, genrm)


def uses_genrm_model(cfg: Config) -> bool:
    """True when the run serves a GenRM model on its own GPUs (not the program checker or an external URL)."""
    return cfg.algorithm.name == "fapo" and cfg.genrm.backend in ("sglang", "embedded")
