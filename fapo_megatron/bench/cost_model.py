"""Predicted step time and phase breakdown of a colocated FAPO recipe on N nodes, before a job is submitted.

Every GPU of the actor pool runs each phase in turn (docs/ARCHITECTURE.md), so a step is the sum of its phases.
Terms: G = GPUs of the pool (nodes x GPUs per node); N = a model's parameter count (cluster/sizing.py shapes);
B = data.batch_size prompts, n = rollout.n, so R = B x n rollouts; P, L = mean prompt and response tokens.

  rollout     switch + prefill + R x L / (G x r) + (max_response_tokens - L) / s_policy
  GenRM       switch + prefill + J x V / (G_genrm x r_genrm) + (V_max - V) / s_genrm, J = accuracy x R verdicts
  log-probs   R x E[S x forward FLOPs/token(S)] / (G x peak x logprob_mfu)
  update      ppo_epochs x R x E[S x train FLOPs/token(S)] x recompute / (G x peak x actor_mfu)
  weight sync 2 N / rollout.tp bytes per GPU / weight_sync_gb_per_s
  other       nothing: answer checking and Ray round trips are small at this scale (a run's `idle` shows them)

where r is the bulk decode rate per GPU (tokens/s) of a serving engine, scaled from a measured reference by
parameter count (decoding is bound by reading the weights, so the rate goes as 1/N); s is the decode rate of one
sequence on its engine's tp GPUs once the batch has thinned out (weight bytes / HBM bandwidth): the step waits
for its longest generation, which ends after the bulk at that rate. prefill = prompt-side tokens x 2N FLOPs at
prefill_mfu. recompute = 4/3 under full activation recomputation (one more forward). V, V_max: mean and longest
GenRM output, capped by genrm.max_new_tokens. FLOPs per token: bench/flops.py. S is the length a row is computed
at: with packing (parallel.max_tokens_per_micro_batch > 0) its own P + L_i; padded, P + the expected longest
response of the rows padded together (a mini-batch of mini_batch_size x n rows in the update, the whole batch in
the log-prob pass). Response lengths L_i: the mean alone, or with response_tokens_sigma > 0 equal-mass quantiles
of a lognormal with that mean, capped at rollout.max_response_tokens (response_lengths).
The defaults below are the project's measurements (benchmarks/RESULTS.md, PLATFORM.md) or FAPO.md's numbers;
each can be replaced by a run's measurement (`bench breakdown` writes them under "measured"). A run's measured
rollout / GenRM rate is the phase's effective rate (its tail included), so fed back here it counts the tail twice
and gives an upper bound on the phase time.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

from fapo_megatron.bench.flops import forward_flops_per_token, train_flops_per_token
from fapo_megatron.cluster.sizing import resolve_shape, uses_genrm_model
from fapo_megatron.config import Config, ConfigError, load_config
from fapo_megatron.models.spec import ModelSpec

PHASES = ("rollout", "genrm", "logprobs", "update", "weight_sync")
RECIPES = {"qwen2.5-math-7b": "qwen2.5-math-7b_fapo.yaml", "qwen2.5-32b": "qwen2.5-32b_fapo.yaml"}
"""--model name -> recipe file in configs/."""
PAPER_SPLITS = {
    "qwen2.5-math-7b": {"nodes": 4, "rollout": 0.42, "genrm": 0.18, "update": 0.33},
    "qwen2.5-32b": {"nodes": 8, "rollout": 0.60, "genrm": 0.14, "update": 0.20},
}
"""FAPO paper's reported share of step time per phase (FAPO.md), with the node count it ran on."""


@dataclass(kw_only=True)
class CostAssumptions:
    peak_tflops: float = 989.0
    """bf16 dense peak of one GPU (H100 / H200 SXM)."""
    actor_mfu: float = 0.28
    """MFU of the actor's forward + backward: megatron local spec + SDPA on H200, 1.5B shape (RESULTS.md)."""
    logprob_mfu: float = 0.28
    """MFU of the actor's log-prob forward pass (taken equal to the training step's)."""
    prompt_tokens_mean: float = 150.0
    """Mean prompt tokens (a DAPO-Math-17K question in the chat template)."""
    response_tokens_mean: float = 0.0
    """Mean response tokens; 0: response_fraction x rollout.max_response_tokens."""
    response_fraction: float = 0.3
    """Mean response length as a share of the budget, over a run (lengths grow during RL)."""
    response_tokens_sigma: float = 0.0
    """Spread of response lengths: sigma of log length of a lognormal with the mean above (capped at the budget);
    0: every response the mean length."""
    accuracy: float = 0.5
    """Share of rollouts with a correct answer: the ones the GenRM judges (FAPO.md)."""
    decode_ref_tokens_per_s_per_gpu: float = 28000.0
    """Bulk decode rate of a serving engine on the reference model: 10 x HF generate's 2.8k tokens/s at batch 256
    on the 1.5B shape (PLATFORM.md: 'a serving engine does roughly 10x better')."""
    decode_ref_params_b: float = 1.54
    """Parameters (billions) of that reference model (Qwen2.5-1.5B)."""
    rollout_tokens_per_s_per_gpu: float = 0.0
    """Bulk decode rate of the policy per GPU; 0: the reference rate scaled by parameter count."""
    genrm_tokens_per_s_per_gpu: float = 0.0
    """Bulk decode rate of the GenRM per GPU; 0: the reference rate scaled by parameter count."""
    hbm_tb_per_s: float = 3.35
    """HBM bandwidth of one GPU (H100 SXM 3.35, H200 4.8 TB/s): bounds single-sequence decoding."""
    decode_bandwidth_efficiency: float = 0.5
    """Share of HBM bandwidth a thinned-out decode batch reaches."""
    prefill_mfu: float = 0.4
    """MFU of the engines' prompt (prefill) pass."""
    genrm_output_tokens_mean: float = 3500.0
    """Mean GenRM output per verdict (FAPO.md: typical outputs are 3-4k tokens)."""
    genrm_longest_tokens: float = 8192.0
    """Longest GenRM output of a step (capped by genrm.max_new_tokens): the phase waits for it."""
    genrm_prompt_overhead_tokens: float = 300.0
    """GenRM prompt tokens beyond the question and the solution: instructions, ground truth, paragraph tags."""
    weight_sync_gb_per_s: float = 40.0
    """Actor -> engine weight update rate per GPU: pinned host<->device 52 GB/s / the measured 1.3x update cost."""
    engine_switch_seconds: float = 0.86
    """Waking an engine and putting it back to sleep (resume 0.04 s + release 0.82 s, RESULTS.md)."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if getattr(self, f.name) < 0:
                raise ConfigError(f"cost assumption {f.name}={getattr(self, f.name)} must be >= 0")
        for name in (
            "peak_tflops",
            "actor_mfu",
            "logprob_mfu",
            "decode_ref_tokens_per_s_per_gpu",
            "decode_ref_params_b",
            "hbm_tb_per_s",
            "decode_bandwidth_efficiency",
            "prefill_mfu",
            "weight_sync_gb_per_s",
        ):
            if getattr(self, name) == 0:
                raise ConfigError(f"cost assumption {name} must be > 0")


def assumptions_with(base: CostAssumptions, updates: dict) -> CostAssumptions:
    """`base` with `updates` ({field: number}); an unknown name is an error naming the valid ones."""
    valid = {f.name for f in dataclasses.fields(CostAssumptions)}
    for key, value in updates.items():
        if key not in valid:
            raise ConfigError(f"unknown cost assumption {key!r}; valid: {', '.join(sorted(valid))}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"cost assumption {key}={value!r} must be a number")
    return dataclasses.replace(base, **{k: float(v) for k, v in updates.items()})


def load_assumptions(path: str | Path) -> dict:
    """A JSON file of assumptions: a flat {field: number} or a `bench breakdown` JSON (its "measured" part)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: cannot read assumptions: {err}") from None
    raw = raw.get("measured", raw) if isinstance(raw, dict) else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object of assumption names to numbers")
    return raw


@dataclass
class Prediction:
    name: str
    gpus: int
    seconds: dict[str, float]
    """Seconds per phase of PHASES."""
    detail: dict[str, float]
    """The derived quantities behind the seconds (tokens, rates, FLOPs per token)."""
    steps: int
    """trainer.steps of the recipe."""

    @property
    def step_seconds(self) -> float:
        return sum(self.seconds.values())

    @property
    def shares(self) -> dict[str, float]:
        total = self.step_seconds
        return {k: v / total for k, v in self.seconds.items()}

    @property
    def run_hours(self) -> float:
        return self.steps * self.step_seconds / 3600.0


def decode_rate(a: CostAssumptions, shape: ModelSpec, measured: float) -> float:
    """Bulk decode tokens/s per GPU: `measured` when > 0, else the reference rate scaled by 1/N."""
    return measured or a.decode_ref_tokens_per_s_per_gpu * a.decode_ref_params_b * 1e9 / shape.num_params


def single_sequence_rate(a: CostAssumptions, shape: ModelSpec, tp: int) -> float:
    """Tokens/s of one sequence on a tp-GPU engine: every token reads the bf16 weights once."""
    return a.hbm_tb_per_s * 1e12 * a.decode_bandwidth_efficiency * tp / (2.0 * shape.num_params)


def generation_seconds(a, shape, *, tp, gpus, sequences, prompt_tokens, mean_out, longest_out, rate) -> float:
    """One engine phase: wake/sleep + prefill + bulk decode + the longest output's tail past the mean."""
    prefill = sequences * prompt_tokens * 2.0 * shape.num_params / (gpus * a.peak_tflops * 1e12 * a.prefill_mfu)
    bulk = sequences * mean_out / (gpus * rate)
    tail = max(longest_out - mean_out, 0.0) / single_sequence_rate(a, shape, tp)
    return a.engine_switch_seconds + prefill + bulk + tail


LENGTH_QUANTILES = 2048
"""Equal-mass quantiles standing for a lognormal length distribution."""


def response_lengths(a: CostAssumptions, budget: int) -> list[float]:
    """Response lengths of equal probability standing for the distribution `a` describes, capped at `budget`."""
    mean = a.response_tokens_mean or a.response_fraction * budget
    sigma = a.response_tokens_sigma
    if sigma == 0:
        return [min(mean, budget)]
    mu = math.log(mean) - sigma * sigma / 2  # a lognormal's mean is exp(mu + sigma^2 / 2)
    normal = NormalDist()
    quantiles = ((i + 0.5) / LENGTH_QUANTILES for i in range(LENGTH_QUANTILES))
    return [min(math.exp(mu + sigma * normal.inv_cdf(u)), budget) for u in quantiles]


def expected_longest(lengths: list[float], rows: int) -> float:
    """Expected longest of `rows` independent draws from `lengths` (equally likely): the length a padded batch of
    that many rows is computed at. P(longest <= i-th smallest) = ((i + 1) / K)^rows."""
    ordered, count = sorted(lengths), len(lengths)
    return sum(x * (((i + 1) / count) ** rows - (i / count) ** rows) for i, x in enumerate(ordered))


def row_flops(flops_per_token, prompt: float, lengths: list[float], *, packed: bool, padded_rows: int) -> float:
    """Mean FLOPs of one row: packed, each row its own length; padded, every row at the expected longest of the
    `padded_rows` rows padded together."""
    if packed:
        return sum((prompt + x) * flops_per_token(prompt + x) for x in lengths) / len(lengths)
    seq = prompt + expected_longest(lengths, padded_rows)
    return seq * flops_per_token(seq)


def predict(cfg: Config, a: CostAssumptions, policy: ModelSpec, genrm: ModelSpec | None, name: str = "") -> Prediction:
    """Phase seconds of one step of `cfg` under `a`; `genrm` None: no GenRM model runs (GRPO, program judge)."""
    gpus = cfg.cluster.world_size
    rollouts = cfg.data.batch_size * cfg.rollout.n
    lengths = response_lengths(a, cfg.rollout.max_response_tokens)
    response = sum(lengths) / len(lengths)
    seq = a.prompt_tokens_mean + response
    packed = cfg.parallel.max_tokens_per_micro_batch > 0
    mini_batch_rows = cfg.algorithm.mini_batch_size * cfg.rollout.n

    def flops(per_token, padded_rows: int) -> float:
        return row_flops(per_token, a.prompt_tokens_mean, lengths, packed=packed, padded_rows=padded_rows)

    logprob_flops = flops(lambda s: forward_flops_per_token(policy, s), rollouts)
    update_flops = flops(lambda s: train_flops_per_token(policy, s), mini_batch_rows)
    peak = gpus * a.peak_tflops * 1e12
    rate = decode_rate(a, policy, a.rollout_tokens_per_s_per_gpu)
    seconds = {
        "rollout": generation_seconds(
            a,
            policy,
            tp=cfg.rollout.tp,
            gpus=gpus,
            sequences=rollouts,
            prompt_tokens=a.prompt_tokens_mean,
            mean_out=response,
            longest_out=cfg.rollout.max_response_tokens,
            rate=rate,
        ),
        "genrm": 0.0,
        "logprobs": rollouts * logprob_flops / (peak * a.logprob_mfu),
        "update": cfg.algorithm.ppo_epochs
        * rollouts
        * update_flops
        * (4.0 / 3.0 if cfg.parallel.recompute == "full" else 1.0)
        / (peak * a.actor_mfu),
        "weight_sync": 2.0 * policy.num_params / cfg.rollout.tp / (a.weight_sync_gb_per_s * 1e9),
    }
    detail = {
        "rollouts": rollouts,
        "response_tokens_mean": response,
        "rollout_tokens_per_s_per_gpu": rate,
        "policy_single_sequence_tokens_per_s": single_sequence_rate(a, policy, cfg.rollout.tp),
        "update_gflop_per_token": train_flops_per_token(policy, seq) / 1e9,
        "update_gflop_per_row": update_flops / 1e9,
        "packed": packed,
    }
    if genrm is not None:
        judged = a.accuracy * rollouts
        genrm_gpus = cfg.cluster.genrm_devices if cfg.genrm.placement == "separate" else gpus
        mean_out = min(a.genrm_output_tokens_mean, cfg.genrm.max_new_tokens)
        longest = min(max(a.genrm_longest_tokens, mean_out), cfg.genrm.max_new_tokens)
        genrm_rate = decode_rate(a, genrm, a.genrm_tokens_per_s_per_gpu)
        seconds["genrm"] = generation_seconds(
            a,
            genrm,
            tp=cfg.genrm.tp,
            gpus=genrm_gpus,
            sequences=judged,
            mean_out=mean_out,
            longest_out=longest,
            prompt_tokens=seq + a.genrm_prompt_overhead_tokens,
            rate=genrm_rate,
        )
        detail.update(
            judged=judged,
            genrm_output_tokens_mean=mean_out,
            genrm_longest_tokens=longest,
            genrm_tokens_per_s_per_gpu=genrm_rate,
            genrm_single_sequence_tokens_per_s=single_sequence_rate(a, genrm, cfg.genrm.tp),
        )
    return Prediction(name=name or policy.name, gpus=gpus, seconds=seconds, detail=detail, steps=cfg.trainer.steps)


def configs_dir() -> Path:
    """The repository's configs/ folder (the shipped recipes)."""
    return Path(__file__).resolve().parents[2] / "configs"


def recipe_config(model: str, nodes: int | None, gpus_per_node: int, overrides=()) -> Config:
    """The shipped recipe for `model` on `nodes` (None: the recipe's own) x `gpus_per_node`, validated like any
    run config (a node count the parallel plan cannot split over is an error naming the keys)."""
    if model not in RECIPES:
        raise ConfigError(f"--model {model!r}: choose one of {', '.join(RECIPES)}")
    path = configs_dir() / RECIPES[model]
    sizing = [f"cluster.devices_per_node={gpus_per_node}"]
    if nodes is not None:
        sizing.append(f"cluster.num_nodes={nodes}")
    try:
        return load_config(path, [*sizing, *overrides])
    except ConfigError as err:
        raise ConfigError(f"{path.name} with {' '.join(sizing)}: {err}") from None


def shapes_for(cfg: Config) -> tuple[ModelSpec, ModelSpec | None]:
    """Policy and GenRM shapes of `cfg` from the checkpoints' config.json or the built-in table (no download)."""
    policy = resolve_shape(cfg.model.path, cfg.sizing.model_shape, "sizing.model_shape")
    genrm = None
    if uses_genrm_model(cfg):
        genrm = resolve_shape(cfg.genrm.model_path, cfg.sizing.genrm_shape, "sizing.genrm_shape")
    return policy, genrm
