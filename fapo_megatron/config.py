"""One typed config tree for every fapo-megatron command.

A run's config is a YAML file (see configs/) plus dotted command-line overrides (`algorithm.lam=0.5`).
Both are checked against the dataclasses below before any work starts: an unknown key names its path and
the closest valid names, a wrong type or an out-of-range value says which field and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A user mistake in a config file or override; the message names the key."""


@dataclass(kw_only=True)
class ModelConfig:
    path: str = ""
    """HF checkpoint folder (config.json + safetensors) the policy starts from. Empty: build `tiny` at random."""
    tiny: str = "llama"
    """Family of the random tiny model used when `path` is empty (llama, qwen2, qwen3)."""
    tokenizer: str = ""
    """Tokenizer folder; empty means `path`."""
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    """Parameter / compute dtype of the actor (float32 on CPU)."""
    megatron_checkpoint: str = ""
    """Megatron distributed checkpoint to start from instead of `path`'s safetensors: an actor checkpoint (folder or
    root with `latest`) or a `convert hf-to-megatron` output (weights only: optimizer, schedule and step start
    fresh). With `path` empty, the model's HF config comes from the checkpoint's meta.json."""

    def __post_init__(self):
        _check_choice("model.tiny", self.tiny, ("llama", "qwen2", "qwen3"))


@dataclass(kw_only=True)
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size of the actor."""
    pp: int = 1
    """Pipeline-parallel size of the actor."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (GPU only; needs tp > 1)."""
    micro_batch_size: int = 1
    """Sequences per micro-batch in forward/backward (when max_tokens_per_micro_batch is 0)."""
    max_tokens_per_micro_batch: int = 0
    """Token budget of a micro-batch: rows packed back to back (first-fit-decreasing, a longer row alone) and spread
    over DP ranks by token count; 0 keeps fixed micro_batch_size rows padded to the longest."""
    logprob_chunk_tokens: int = 0
    """Positions whose log-probs and entropy are computed at a time from the logits (backward recomputes the
    softmax chunk by chunk): float32 working memory of one chunk instead of a whole micro-batch; 0: all at once."""
    use_distributed_optimizer: bool = True
    """Shard optimizer state over data-parallel ranks."""
    overlap_grad_reduce: bool = False
    """Reduce (-scatter) each gradient bucket over DP ranks as soon as backward has filled it, while the rest of
    backward runs (megatron DDP); false: one reduction after the last micro-batch."""
    overlap_param_gather: bool = False
    """With the distributed optimizer: all-gather the updated parameters bucket by bucket during the next
    mini-batch's forward instead of right after each optimizer step (needs overlap_grad_reduce); a train step
    ends with the parameters gathered."""
    ddp_bucket_size: int = 0
    """Parameters per gradient bucket with overlap_grad_reduce; 0: megatron's default, max(40M, 1M x dp)."""
    grad_reduce_in_fp32: bool = True
    """Accumulate and reduce gradients in fp32; false keeps them in model.dtype (bf16: half the gradient memory
    and DP traffic)."""
    offload_actor: bool = True
    """Move the actor's parameters and optimizer state to host memory while the colocated engines generate."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recomputation: none, selective (core attention only), full (every layer's input kept)."""
    recompute_num_layers: int = 1
    """With recompute=full: layers per recomputed chunk (megatron's uniform method keeps one input per chunk)."""

    def __post_init__(self):
        _check_positive("parallel.tp", self.tp)
        _check_positive("parallel.pp", self.pp)
        _check_positive("parallel.micro_batch_size", self.micro_batch_size)
        _check_choice("parallel.recompute", self.recompute, ("none", "selective", "full"))
        _check_positive("parallel.recompute_num_layers", self.recompute_num_layers)
        _check_range("parallel.max_tokens_per_micro_batch", self.max_tokens_per_micro_batch, low=0)
        _check_range("parallel.ddp_bucket_size", self.ddp_bucket_size, low=0)
        _check_range("parallel.logprob_chunk_tokens", self.logprob_chunk_tokens, low=0)
        if self.overlap_param_gather and not (self.use_distributed_optimizer and self.overlap_grad_reduce):
            raise ConfigError(
                "parallel.overlap_param_gather=true needs parallel.use_distributed_optimizer=true and "
                "parallel.overlap_grad_reduce=true (megatron gathers the optimizer's parameter shards per bucket)"
            )
        if self.ddp_bucket_size and not self.overlap_grad_reduce:
            raise ConfigError(
                f"parallel.ddp_bucket_size={self.ddp_bucket_size} only applies with parallel.overlap_grad_reduce=true "
                "(otherwise megatron reduces all gradients in one bucket)"
            )


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 1e-6
    """Peak learning rate (AdamW)."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay."""
    lr_decay_style: Literal["constant", "linear", "cosine"] = "constant"
    """Schedule after warm-up."""
    warmup_steps: int = 10
    """Optimizer steps of linear warm-up."""
    weight_decay: float = 0.1
    """Decoupled weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    clip_grad: float = 1.0
    """Global grad-norm clip; 0 disables it."""
    on_non_finite: Literal["stop", "skip"] = "stop"
    """An update whose loss or gradient holds NaN/inf: stop the run before applying it (the last checkpoint stays
    good), or skip it (counted as actor/skipped_non_finite)."""
    precision_aware: bool = False
    """megatron-core's precision-aware optimizer: Adam's moments in exp_avg_dtype / exp_avg_sq_dtype, the update
    reading the gradient buffer as it is (Transformer Engine's FusedAdam, or the CPU-offload optimizer; CUDA with
    Transformer Engine, and parallel.use_distributed_optimizer)."""
    exp_avg_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Adam first moment's dtype (precision_aware only)."""
    exp_avg_sq_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Adam second moment's dtype (precision_aware only)."""
    cpu_offload_fraction: float = 0.0
    """Share of the optimizer state kept, and its Adam update run, in host memory (megatron's
    HybridDeviceOptimizer; CUDA only, needs precision_aware); 0: all on the device."""

    def __post_init__(self):
        _check_range("optim.lr", self.lr, low=0.0, low_open=True)
        _check_range("optim.min_lr", self.min_lr, low=0.0, high=self.lr)
        _check_range("optim.warmup_steps", self.warmup_steps, low=0)
        _check_range("optim.weight_decay", self.weight_decay, low=0.0)
        _check_range("optim.adam_beta1", self.adam_beta1, low=0.0, high=1.0, high_open=True)
        _check_range("optim.adam_beta2", self.adam_beta2, low=0.0, high=1.0, high_open=True)
        _check_range("optim.clip_grad", self.clip_grad, low=0.0)
        _check_range("optim.cpu_offload_fraction", self.cpu_offload_fraction, low=0.0, high=1.0)
        low_moments = [f"optim.{k}={getattr(self, k)}" for k in ("exp_avg_dtype", "exp_avg_sq_dtype")]
        low_moments = [item for item in low_moments if not item.endswith("=float32")]
        if low_moments and not self.precision_aware:
            raise ConfigError(f"{', '.join(low_moments)} needs optim.precision_aware=true (megatron keeps fp32 Adam)")
        if self.cpu_offload_fraction > 0 and not self.precision_aware:
            raise ConfigError(
                f"optim.cpu_offload_fraction={self.cpu_offload_fraction:g} needs optim.precision_aware=true "
                "(megatron's hybrid CPU/GPU optimizer runs on the precision-aware code path)"
            )
        if self.cpu_offload_fraction > 0 and low_moments:
            raise ConfigError(
                f"optim.cpu_offload_fraction={self.cpu_offload_fraction:g} keeps fp32 Adam moments: "
                f"{', '.join(low_moments)} would not apply"
            )


@dataclass(kw_only=True)
class RolloutConfig:
    backend: Literal["embedded", "sglang"] = "embedded"
    """Generation engine for the policy: in-process HF (runs anywhere) or SGLang servers (GPU)."""
    placement: Literal["colocated", "separate"] = "colocated"
    """Time-share the actor's devices, or run the engines in workers of their own on `cluster.rollout_devices`
    (the actor's rank 0 broadcasts the weights to them after every update)."""
    n: int = 8
    """Rollouts per prompt (the GRPO group size; at least 2, since one rollout's group advantage is always 0)."""
    temperature: float = 1.0
    """Sampling temperature (also scales the actor's logits when it recomputes log-probs)."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    top_k: int = -1
    """Top-k sampling: keep the k likeliest tokens (k >= 1); -1 disables it."""
    max_prompt_tokens: int = 2048
    """Prompts longer than this are left out of training (counted)."""
    max_response_tokens: int = 8192
    """Generation budget per rollout."""
    tp: int = 1
    """Tensor-parallel size of each SGLang engine."""
    mem_fraction: float = 0.6
    """SGLang `mem_fraction_static`."""
    weight_sync_bucket_mb: int = 512
    """Bucket size of the actor -> engine weight push."""
    sglang_port: int = 30000
    """First port of the SGLang servers this run launches."""
    sglang_url: str = ""
    """Use an already running SGLang server instead of launching one."""
    request_timeout_s: float = 600.0
    """Per-request timeout when talking to an engine server."""
    deterministic_inference: bool = False
    """Launch the SGLang rollout servers with --enable-deterministic-inference, so the per-rollout seeds (from
    trainer.seed) are honoured and rollouts repeat; it costs throughput (batch-invariant kernels, the pytorch sampler,
    a restricted attention backend, tree all-reduce at TP > 1). Without it SGLang ignores seeds: the engine warns
    once and leaves them out. An attached server (sglang_url) keeps its own flags; the embedded engine always seeds."""

    def __post_init__(self):
        if self.n < 2:
            raise ConfigError(
                f"rollout.n={self.n} must be >= 2: group advantages compare a prompt's rollouts; "
                "a group of one learns nothing"
            )
        if self.top_k != -1 and self.top_k < 1:
            raise ConfigError(f"rollout.top_k={self.top_k} is not allowed; use -1 (off) or a k >= 1")
        _check_range("rollout.sglang_port", self.sglang_port, low=1, high=65535)
        _check_range("rollout.temperature", self.temperature, low=0.0)
        _check_range("rollout.top_p", self.top_p, low=0.0, high=1.0, low_open=True)
        _check_positive("rollout.max_prompt_tokens", self.max_prompt_tokens)
        _check_positive("rollout.max_response_tokens", self.max_response_tokens)
        _check_positive("rollout.tp", self.tp)
        _check_range("rollout.mem_fraction", self.mem_fraction, low=0.0, high=1.0, low_open=True)
        _check_positive("rollout.weight_sync_bucket_mb", self.weight_sync_bucket_mb)


@dataclass(kw_only=True)
class GenRMConfig:
    backend: Literal["program", "embedded", "sglang", "external"] = "program"
    """Flaw detector: the arithmetic-chain step checker, an HF model in-process, SGLang, or a URL."""
    placement: Literal["colocated", "separate"] = "colocated"
    """Time-share the actor's devices, or run on a pool of its own (`cluster.genrm_devices`)."""
    model_path: str = ""
    """GenRM checkpoint (embedded / sglang backends)."""
    url: str = ""
    """External OpenAI-compatible or SGLang-router endpoint (external backend)."""
    api: Literal["openai", "sglang"] = "sglang"
    """Request format of the external endpoint."""
    max_new_tokens: int = 16384
    """Output budget per verdict."""
    temperature: float = 0.6
    """Sampling temperature of the judge."""
    max_steps: int = 32
    """Solutions with more paragraphs are merged down to this many steps."""
    concurrency: int = 64
    """Requests in flight at once."""
    request_timeout_s: float = 600.0
    """Bound on one request."""
    deadline_s: float = 1800.0
    """Bound on the step's wait for its verdicts; what is not back by then is unavailable."""
    stream: bool = True
    """External GenRM or GenRM workers on their own pool (`placement=separate`): send each correct rollout's
    request the moment its generation finishes and run the actor's old-log-prob pass while verdicts are
    outstanding (the step waits only for the tail); false: judge after the whole rollout, then the log-prob pass.
    Colocated GenRM workers always judge after the rollout (they share its devices)."""
    retries: int = 2
    """Retries per request, with exponential backoff."""
    unavailable_policy: Literal["treat_as_clean", "treat_as_flawed", "drop", "fail"] = "drop"
    """What a verdict that could not be had counts as; never silently clean unless asked for."""
    max_unavailable_fraction: float = 0.5
    """A step whose share of unavailable verdicts (of those asked) exceeds this fails with an error instead of
    training on what is left; 1.0 never fails."""
    tp: int = 1
    """Tensor-parallel size of the GenRM engine."""
    mem_fraction: float = 0.4
    """SGLang `mem_fraction_static` of the GenRM engine (weights + KV cache share of each GPU)."""

    def __post_init__(self):
        _check_range("genrm.mem_fraction", self.mem_fraction, low=0.0, high=1.0, low_open=True)
        _check_positive("genrm.max_new_tokens", self.max_new_tokens)
        _check_positive("genrm.max_steps", self.max_steps)
        _check_positive("genrm.concurrency", self.concurrency)
        _check_range("genrm.request_timeout_s", self.request_timeout_s, low=0.0, low_open=True)
        _check_range("genrm.deadline_s", self.deadline_s, low=0.0, low_open=True)
        _check_range("genrm.retries", self.retries, low=0)
        _check_range("genrm.temperature", self.temperature, low=0.0)
        _check_range("genrm.max_unavailable_fraction", self.max_unavailable_fraction, low=0.0, high=1.0)
        _check_positive("genrm.tp", self.tp)
        if self.backend == "external" and not self.url:
            raise ConfigError("genrm.backend=external needs genrm.url (an OpenAI-compatible or SGLang-router URL)")


@dataclass(kw_only=True)
class OverlongConfig:
    enable: bool = True
    """DAPO overlong shaping of the reward."""
    buffer: int = 4096
    """Tokens before the limit where the penalty starts."""
    penalty_factor: float = 1.0
    """Penalty at the limit."""

    def __post_init__(self):
        _check_range("algorithm.overlong.buffer", self.buffer, low=0)
        _check_range("algorithm.overlong.penalty_factor", self.penalty_factor, low=0.0)


@dataclass(kw_only=True)
class AlgorithmConfig:
    name: Literal["fapo", "grpo"] = "fapo"
    """fapo: flaw penalty from the GenRM; grpo: the same loop without GenRM (the baseline)."""
    reward: Literal["outcome", "genrm_step"] = "outcome"
    """outcome: the answer check (+ FAPO flaw penalty); genrm_step: train a GenRM, the policy's boxed step index
    scored by the step-distance reward against the item's label (needs data.format=genrm_steps, name=grpo)."""
    lam: float = 1.0
    """Flaw penalty lambda: a flawed positive gets 1 - lambda."""
    clip_low: float = 0.2
    """PPO clip epsilon below 1."""
    clip_high: float = 0.28
    """PPO clip epsilon above 1 (clip-higher)."""
    dual_clip_c: float = 10.0
    """Dual-clip bound for negative advantages; 0 disables it."""
    loss_agg_mode: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"] = "token-mean"
    """How per-token losses become one number."""
    norm_adv_by_std: bool = True
    """Divide group advantages by the group std (GRPO); False is Dr.GRPO."""
    kl_coef: float = 0.0
    """KL penalty to reference log-probs: the rollout engine's when no reference model is given (0: none, as in
    the paper)."""
    kl_type: Literal["k1", "k3"] = "k3"
    """KL estimator."""
    entropy_coef: float = 0.0
    """Entropy bonus (0: none, as in the paper)."""
    tis_cap: float = 0.0
    """Truncated importance-sampling cap for the rollout/actor mismatch; 0 disables it."""
    mini_batch_size: int = 32
    """Prompts per optimizer step (each brings `rollout.n` rollouts)."""
    ppo_epochs: int = 1
    """Passes over a step's rollouts."""
    overlong: OverlongConfig = field(default_factory=OverlongConfig)
    """DAPO overlong reward shaping."""

    def __post_init__(self):
        _check_range("algorithm.lam", self.lam, low=0.0)
        _check_range("algorithm.clip_low", self.clip_low, low=0.0, high=1.0, low_open=True, high_open=True)
        _check_range("algorithm.clip_high", self.clip_high, low=0.0, low_open=True)
        if self.dual_clip_c != 0.0 and self.dual_clip_c <= 1.0:
            raise ConfigError(f"algorithm.dual_clip_c={self.dual_clip_c}: must be > 1 (or 0 to disable dual-clip)")
        _check_range("algorithm.kl_coef", self.kl_coef, low=0.0)
        _check_range("algorithm.tis_cap", self.tis_cap, low=0.0)
        _check_positive("algorithm.mini_batch_size", self.mini_batch_size)
        _check_positive("algorithm.ppo_epochs", self.ppo_epochs)


@dataclass(kw_only=True)
class DataConfig:
    format: Literal["arith", "dapo", "gsm8k", "math", "genrm_steps"] = "arith"
    """Training data layout: synthetic arithmetic chains, DAPO-Math-17K jsonl, GSM8K or MATH jsonl, or
    ProcessBench-format step-labelled items for GenRM training (split with genrm.max_steps)."""
    train_path: str = ""
    """jsonl file of training prompts (unused for `arith`)."""
    val_path: str = ""
    """jsonl file of validation prompts; empty: no validation (or held-out arith items)."""
    batch_size: int = 512
    """Prompts per training step."""
    seed: int = 1234
    """Shuffling and synthetic-data seed."""
    arith_num_train: int = 2000
    """Number of synthetic arithmetic-chain training items."""
    arith_num_val: int = 64
    """Number of synthetic arithmetic-chain validation items."""
    arith_min_steps: int = 2
    """Fewest operations in a synthetic chain."""
    arith_max_steps: int = 4
    """Most operations in a synthetic chain."""
    arith_max_value: int = 999
    """Largest running value of a synthetic chain."""
    arith_max_operand: int = 20
    """Largest number added or subtracted in a synthetic chain."""
    arith_identity_steps: int = 0
    """Trivial steps (x 1, + 0) inserted into each synthetic chain, where a flawed shortcut costs no accuracy."""

    def __post_init__(self):
        _check_positive("data.batch_size", self.batch_size)
        if self.format != "arith" and not self.train_path:
            raise ConfigError(f"data.format={self.format} needs data.train_path (a jsonl file)")
        _check_positive("data.arith_min_steps", self.arith_min_steps)
        _check_range("data.arith_max_steps", self.arith_max_steps, low=self.arith_min_steps)
        _check_range("data.arith_max_value", self.arith_max_value, low=4)
        _check_positive("data.arith_max_operand", self.arith_max_operand)
        _check_range("data.arith_identity_steps", self.arith_identity_steps, low=0)


@dataclass(kw_only=True)
class TrainerConfig:
    steps: int = 200
    """Training steps (one batch of prompts each)."""
    seed: int = 42
    """Global seed (model init, sampling, dropout)."""
    output_dir: str = "runs/default"
    """Where checkpoints, TensorBoard logs, metrics.jsonl and plots go."""
    checkpoint_interval: int = 50
    """Save every this many steps (and at the end); 0: only at the end."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk (oldest deleted first)."""
    async_checkpoint: bool = False
    """Write checkpoints in the background (a forked writer of the state as it was at the save): training goes on,
    the next save or the run's end waits for it, and `latest` names it only once every rank's files are complete."""
    fully_parallel_save: bool = False
    """Spread the writing of DP-replicated shards over the data-parallel ranks (megatron's
    FullyParallelSaveStrategyWrapper) instead of the first DP rank writing them all."""
    resume: str = "auto"
    """auto: continue from output_dir's newest complete checkpoint if there is one; none: start fresh; or the path
    of a checkpoint (folder or root). A fresh start into an output_dir with an earlier run's metrics or checkpoints
    is refused unless `overwrite` is set."""
    overwrite: bool = False
    """Let a fresh start delete an earlier run's metrics.jsonl, TensorBoard logs and checkpoints in output_dir."""
    val_interval: int = 0
    """Validate every this many steps and after the last one (0: never)."""
    val_n: int = 4
    """Samples per validation prompt (avg@k)."""
    val_temperature: float = 1.0
    """Validation sampling temperature."""
    val_top_p: float = 0.7
    """Validation nucleus mass."""
    progress: bool = True
    """Show a progress bar."""
    off_policy_steps: int = 0
    """1: generate step k+1's rollouts while step k trains (needs rollout.placement=separate); the rollouts are then
    sampled by weights one update behind (perf/staleness), which the engine's log-probs and algorithm.tis_cap
    correct for. 0: every step samples with the weights of the update before it."""
    answer_check_workers: int = 2
    """Processes that run math-verify on the answers the normaliser cannot settle (each killable on a timeout);
    they run in the trainer process's host while the devices wait, so two keep a 2-core machine responsive."""

    def __post_init__(self):
        _check_positive("trainer.steps", self.steps)
        _check_positive("trainer.answer_check_workers", self.answer_check_workers)
        _check_range("trainer.off_policy_steps", self.off_policy_steps, low=0, high=1)
        _check_range("trainer.checkpoint_interval", self.checkpoint_interval, low=0)
        _check_positive("trainer.keep_checkpoints", self.keep_checkpoints)
        _check_range("trainer.val_interval", self.val_interval, low=0)
        _check_positive("trainer.val_n", self.val_n)
        _check_range("trainer.val_temperature", self.val_temperature, low=0.0)
        _check_range("trainer.val_top_p", self.val_top_p, low=0.0, high=1.0, low_open=True)
        if not self.output_dir.strip():
            raise ConfigError("trainer.output_dir is empty: name the folder for checkpoints and metrics")
        if self.resume not in ("auto", "none") and not Path(self.resume).exists():
            close = difflib.get_close_matches(self.resume, ["auto", "none"], n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"trainer.resume={self.resume!r}: not auto, none or an existing checkpoint path{hint}")


@dataclass(kw_only=True)
class ClusterConfig:
    device: Literal["cpu", "cuda"] = "cpu"
    """cpu runs Megatron over gloo; cuda over NCCL."""
    num_nodes: int = 1
    """Nodes in the actor pool."""
    devices_per_node: int = 1
    """Actor processes per node (GPUs per node on cuda)."""
    genrm_devices: int = 0
    """Devices of the GenRM's own pool when `genrm.placement=separate`."""
    rollout_devices: int = 0
    """Devices of the rollout engines' own pool when `rollout.placement=separate` (a multiple of rollout.tp)."""
    ray_address: str = ""
    """Existing Ray cluster to join; empty starts a local one."""
    master_port: int = 0
    """Rendezvous port for torch.distributed; 0 picks a free one."""

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.devices_per_node

    def __post_init__(self):
        _check_positive("cluster.num_nodes", self.num_nodes)
        _check_positive("cluster.devices_per_node", self.devices_per_node)
        _check_range("cluster.genrm_devices", self.genrm_devices, low=0)
        _check_range("cluster.rollout_devices", self.rollout_devices, low=0)
        _check_range("cluster.master_port", self.master_port, low=0, high=65535)


@dataclass(kw_only=True)
class SlurmConfig:
    partition: str = ""
    """`--partition`; empty: the cluster default."""
    account: str = ""
    """`--account`; empty: none."""
    qos: str = ""
    """`--qos`; empty: none."""
    time_limit: str = "24:00:00"
    """`--time` of each job (HH:MM:SS or D-HH:MM:SS)."""
    cpus_per_node: int = 0
    """CPUs per node Ray may use (and `--cpus-per-task`); 0: whatever Slurm gives the job."""
    mem: str = ""
    """`--mem` per node (e.g. 0 for all of it); empty: the cluster default."""
    container_image: str = ""
    """Pyxis/enroot image for every step (`srun --container-image`); empty: run on the host."""
    container_mounts: str = ""
    """Pyxis `--container-mounts` (src:dst[,src:dst]); should include the repo and output folders."""
    venv: str = ""
    """Virtualenv whose bin/activate each step sources; empty: the submitting shell's Python."""
    workdir: str = ""
    """Folder each step runs in (holds the config's relative paths); empty: the submit folder."""
    socket_ifname: str = ""
    """Network interface for NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME and the Ray head address; empty: default."""
    hf_home: str = ""
    """HF_HOME on the nodes (shared model cache); empty: inherit."""
    tmpdir: str = ""
    """TMPDIR on the nodes (node-local scratch; Ray's temp folder goes under it); empty: inherit."""
    env: list[str] = field(default_factory=list)
    """Extra KEY=VALUE environment variables exported to every step."""
    log_dir: str = "slurm_logs"
    """Where the sbatch script and the job's stdout/stderr files go."""
    job_name: str = "fapo"
    """`--job-name`."""
    signal_lead_s: int = 600
    """Ask for SIGUSR1 this many seconds before the time limit (checkpoint + requeue); 0: no signal."""
    requeue: bool = True
    """`--requeue`, and requeue the job after a pre-emption checkpoint."""
    chain: int = 1
    """Jobs to submit for one long run; each resumes from the latest checkpoint of the one before."""
    chain_mode: Literal["dependency", "array"] = "dependency"
    """Chain as `--dependency=afterany` jobs or as a job array run one element at a time (`%1`)."""
    ray_port: int = 6379
    """GCS port of the Ray head."""
    ray_join_timeout_s: float = 600.0
    """How long to wait for every node's GPUs (CPUs on cpu) to join Ray."""
    preflight: bool = True
    """Run the preflight checks before training."""
    preflight_port: int = 29411
    """torch.distributed rendezvous port of the preflight all-reduce."""
    min_free_disk_gb: float = 50.0
    """Free space needed under trainer.output_dir for checkpoints."""

    def __post_init__(self):
        _check_range("slurm.cpus_per_node", self.cpus_per_node, low=0)
        _check_range("slurm.signal_lead_s", self.signal_lead_s, low=0)
        _check_positive("slurm.chain", self.chain)
        _check_range("slurm.ray_port", self.ray_port, low=1, high=65535)
        _check_range("slurm.preflight_port", self.preflight_port, low=1, high=65535)
        _check_range("slurm.ray_join_timeout_s", self.ray_join_timeout_s, low=0.0, low_open=True)
        _check_range("slurm.min_free_disk_gb", self.min_free_disk_gb, low=0.0)
        for item in self.env:
            if "=" not in item or not item.split("=", 1)[0].isidentifier():
                raise ConfigError(f"slurm.env item {item!r} must look like NAME=value")


@dataclass(kw_only=True)
class SizingConfig:
    model_shape: str = ""
    """Built-in policy shape (see cluster/sizing.py SHAPES) used when model.path's config.json is not readable."""
    genrm_shape: str = ""
    """Built-in GenRM shape used when genrm.model_path's config.json is not readable."""
    gpu_memory_gb: float = 80.0
    """Memory of one GPU the plan must fit."""
    runtime_overhead_gb: float = 4.0
    """Per-GPU memory outside the estimate: CUDA context, NCCL buffers, allocator fragmentation."""

    def __post_init__(self):
        _check_range("sizing.gpu_memory_gb", self.gpu_memory_gb, low=0.0, low_open=True)
        _check_range("sizing.runtime_overhead_gb", self.runtime_overhead_gb, low=0.0)


@dataclass(kw_only=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Actor parallelism."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Actor optimizer and schedule."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Policy generation."""
    genrm: GenRMConfig = field(default_factory=GenRMConfig)
    """The flaw detector."""
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    """FAPO / GRPO rewards, advantages and loss."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training and validation data."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Loop length, checkpoints, logging."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """Devices, pools and Ray."""
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    """Batch-job settings for `fapo-megatron slurm submit` (flags override them)."""
    sizing: SizingConfig = field(default_factory=SizingConfig)
    """Assumptions of the per-GPU memory estimate (`fapo-megatron slurm size`)."""

    def __post_init__(self):
        world, tp, pp = self.cluster.world_size, self.parallel.tp, self.parallel.pp
        if world % (tp * pp) != 0:
            raise ConfigError(
                f"parallel.tp={tp} x parallel.pp={pp} = {tp * pp} does not divide the {world} actor processes "
                f"(cluster.num_nodes={self.cluster.num_nodes} x cluster.devices_per_node="
                f"{self.cluster.devices_per_node}); pick tp*pp from {_divisors(world)}"
            )
        if self.parallel.sequence_parallel and (tp == 1 or self.cluster.device == "cpu"):
            raise ConfigError("parallel.sequence_parallel=true needs parallel.tp > 1 and cluster.device=cuda")
        self._check_ddp_and_optimizer()
        if self.data.batch_size % self.algorithm.mini_batch_size != 0:
            raise ConfigError(
                f"algorithm.mini_batch_size={self.algorithm.mini_batch_size} must divide "
                f"data.batch_size={self.data.batch_size}"
            )
        per_dp = self.algorithm.mini_batch_size * self.rollout.n
        if per_dp % (self.dp * self.parallel.micro_batch_size) != 0:
            raise ConfigError(
                f"a mini-batch of {per_dp} rollouts (algorithm.mini_batch_size x rollout.n) does not split "
                f"evenly over dp={self.dp} x parallel.micro_batch_size={self.parallel.micro_batch_size}"
            )
        if self.genrm.placement == "separate" and self.genrm.backend in ("embedded", "sglang"):
            if self.cluster.genrm_devices == 0:
                raise ConfigError("genrm.placement=separate needs cluster.genrm_devices > 0")
        self._check_rollout_placement()
        if (self.algorithm.reward == "genrm_step") != (self.data.format == "genrm_steps"):
            raise ConfigError(
                f"algorithm.reward={self.algorithm.reward} with data.format={self.data.format}: GenRM training needs "
                "both algorithm.reward=genrm_step and data.format=genrm_steps, other runs neither"
            )
        if self.algorithm.reward == "genrm_step" and self.algorithm.name != "grpo":
            raise ConfigError("algorithm.reward=genrm_step trains the GenRM with plain GRPO: set algorithm.name=grpo")
        if self.algorithm.overlong.enable and self.algorithm.overlong.buffer > self.rollout.max_response_tokens:
            raise ConfigError(
                f"algorithm.overlong.buffer={self.algorithm.overlong.buffer} exceeds "
                f"rollout.max_response_tokens={self.rollout.max_response_tokens}"
            )

    def _check_rollout_placement(self) -> None:
        rollout, devices = self.rollout, self.cluster.rollout_devices
        if rollout.placement == "colocated":
            if devices:
                raise ConfigError(
                    f"cluster.rollout_devices={devices} is only used with rollout.placement=separate "
                    "(colocated engines run on the actor's devices)"
                )
            if self.trainer.off_policy_steps:
                raise ConfigError(
                    f"trainer.off_policy_steps={self.trainer.off_policy_steps} needs rollout.placement=separate "
                    "(colocated engines share the devices the actor trains on, so nothing can overlap)"
                )
            return
        if devices == 0:
            raise ConfigError("rollout.placement=separate needs cluster.rollout_devices > 0")
        if devices % rollout.tp != 0:
            raise ConfigError(f"rollout.tp={rollout.tp} does not divide the {devices} cluster.rollout_devices")
        if rollout.sglang_url:
            raise ConfigError(
                f"rollout.sglang_url={rollout.sglang_url} attaches to a running server, which no pool of this run "
                "hosts: rollout.placement=separate launches its own engines on cluster.rollout_devices"
            )

    def _check_ddp_and_optimizer(self) -> None:
        """The DDP / optimizer combinations megatron-core refuses, or that would change nothing, named by key."""
        par, optim, on_cpu = self.parallel, self.optim, self.cluster.device == "cpu"
        if not par.grad_reduce_in_fp32 and self.model.dtype == "float32":
            raise ConfigError("parallel.grad_reduce_in_fp32=false changes nothing with model.dtype=float32")
        if optim.precision_aware and not par.use_distributed_optimizer:
            raise ConfigError("optim.precision_aware=true needs parallel.use_distributed_optimizer=true")
        if optim.cpu_offload_fraction > 0 and on_cpu:
            raise ConfigError(
                f"optim.cpu_offload_fraction={optim.cpu_offload_fraction:g} needs cluster.device=cuda "
                "(megatron's hybrid optimizer moves state between CUDA streams and the host)"
            )
        if optim.precision_aware and on_cpu:
            raise ConfigError("optim.precision_aware=true needs cluster.device=cuda with Transformer Engine")

    @property
    def dp(self) -> int:
        return self.cluster.world_size // (self.parallel.tp * self.parallel.pp)


# ---------------------------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML file (or the defaults) and apply `key.sub=value` overrides, then validate everything."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    seen: dict[str, str] = {}
    for item in overrides:
        dotted = item.split("=", 1)[0].strip()
        if dotted in seen:
            raise ConfigError(f"override {dotted} given twice ({seen[dotted]!r} and {item!r}); give it once")
        seen[dotted] = item
        _apply_override(raw, item)
    return from_dict(Config, raw)


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        keys = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in keys:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: key {key!r} given twice in one section")
            keys.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> dict[str, Any]:
    """A config file's mapping; a missing, non-UTF-8, invalid, empty or non-mapping file names itself and the line."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 (byte 0x{data[err.start]:02x})") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if raw is None:
        raise ConfigError(f"{path}: the file is empty; give at least one section (omit the file to use the defaults)")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return raw


def from_dict(cls: type, raw: dict[str, Any], prefix: str = ""):
    """Build dataclass `cls` from nested dicts, checking every key and value type."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(_unknown_key_message(prefix + str(key), key, list(fields)))
        kwargs[key] = _coerce(hints[key], value, prefix + key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {err}") from None


def to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _apply_override(raw: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    dotted, text = item.split("=", 1)
    keys = dotted.strip().split(".")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node = raw
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {key} is not a section")
    node[keys[-1]] = value


def _coerce(hint, value, path: str):
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value if value is not None else {}, path + ".")
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{path}={value!r} is not allowed; choose one of {list(allowed)}")
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _coerce(option, value, path)
            except ConfigError:
                continue
        raise ConfigError(f"{path}={value!r} does not match {hint}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}={value!r} must be true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path}={value!r} must be an integer")
    if hint is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads `5e-5` (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{path}={value!r} must be a number")
        if not math.isfinite(number):  # NaN fails no range check: refuse it (and inf) here, for every field
            raise ConfigError(f"{path}={value!r} must be a finite number")
        return number
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{path}={value!r} must be a string")
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(f"{path}={value!r} must be null")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}={value!r} must be a list")
        (item_hint, *_) = typing.get_args(hint) or (Any,)
        return [_coerce(item_hint, v, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


def _unknown_key_message(path: str, key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(str(key), valid, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return f"unknown config key {path!r}: {hint}valid keys here: {', '.join(valid)}"


def _check_choice(path: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{path}={value!r} is not allowed; choose one of {list(allowed)}")


def _check_positive(path: str, value) -> None:
    if value <= 0:
        raise ConfigError(f"{path}={value} must be > 0")


def _check_range(path, value, *, low=None, high=None, low_open=False, high_open=False) -> None:
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high:
        lo = "" if low is None else ("(" if low_open else "[") + str(low)
        hi = "" if high is None else str(high) + (")" if high_open else "]")
        raise ConfigError(f"{path}={value} is out of range; allowed: {lo or '(-inf'}, {hi or 'inf)'}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
