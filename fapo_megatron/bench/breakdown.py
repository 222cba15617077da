"""Where a finished run's step time went, from the trainer's per-step timers in RUN/metrics.jsonl.

Terms. The trainer times the phases of a step (metrics.PHASES) and logs `perf/step_seconds`, the wall time of
the training part (rollout through weight sync). Validation and checkpoints run after it and are timed on their
own. So a step's wall time is step_seconds + validation + checkpoint, and `idle` is what no timer covers:
answer checking, batch building, Ray round trips. The first step's weight_sync also holds the initial push of
the actor's weights before the loop; where the timed phases exceed the wall time, the wall time is their sum
(idle 0). Shares of the run are time-weighted: mean phase seconds over mean wall seconds.

GenRM. `genrm_visible` is the wall time the step waited for verdicts and is what the columns sum; `genrm_busy`
(the trainer's `time/genrm`) is the judge's busy time, shown beside it: with streamed verdicts it overlaps the
rollout and the log-prob pass, so it is not a column of the sum. Runs logged before `time/genrm_visible` existed
judged synchronously: their visible time is `time/genrm`.

Tokens. Response tokens of a step = perf/tokens_per_second x perf/step_seconds (the kept rollouts' response
tokens, exactly as the trainer counted them). The actor reads prompt + response tokens; prompt tokens come from
the metric `perf/prompt_tokens` when a run logs it, else from a replay of the run's prompt sampler
(bench/replay.py), else a given mean per sequence, else they are left out (MFU is then a lower bound).
Actor MFU uses bench/flops.py with the mean sequence length of the step.

Memory. The trainer's ledger (`memory/<phase>/actor_bytes`: what the actor held on the device in each phase, the
largest rank; on CUDA also `memory/<phase>/device_peak_bytes`) is shown beside what `slurm size` predicts the
actor holds there for the run's config (cluster/sizing.predicted_actor_ledger, from the same phase table).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fapo_megatron.bench.flops import forward_flops_per_token, mfu, train_flops_per_token
from fapo_megatron.cluster.sizing import LEDGER_PHASES, predicted_actor_ledger, resolve_shape
from fapo_megatron.config import Config, ConfigError, load_config
from fapo_megatron.metrics import read_metrics
from fapo_megatron.models.spec import ModelSpec, model_spec, tiny_hf_config

TIMED = ("rollout", "genrm_visible", "logprobs", "update", "weight_sync")
"""Phases timed inside the training part of a step, in the order they run."""
COLUMNS = (*TIMED, "val_ckpt", "idle")
"""The breakdown's columns: the timed phases, validation + checkpoint, and untimed time."""
DEFAULT_GPU_PEAK_TFLOPS = 989.0
"""bf16 dense peak of one H100 / H200 SXM."""


@dataclass
class StepBreakdown:
    step: int
    seconds: dict[str, float]
    """Seconds per column of COLUMNS."""
    wall_seconds: float
    response_tokens: float
    prompt_tokens: float
    sequences: float
    """Rollouts the actor trained on (kept ones)."""
    genrm_busy_seconds: float
    """The judge's busy time (`time/genrm`); overlaps other columns when verdicts stream."""
    genrm_asked: float
    genrm_output_tokens: float
    accuracy: float
    weight_sync_bytes: float


@dataclass
class LedgerRow:
    phase: str
    actor_bytes: float | None
    """The most the actor held in this phase over the steps (None: the run logged no ledger)."""
    predicted_bytes: float
    """`slurm size`'s actor bytes for this phase (cluster/sizing.predicted_actor_ledger)."""
    device_peak_bytes: float | None = None
    """The CUDA allocator's peak during the phase, the most over the steps (None on CPU)."""


def memory_ledger(records: list[dict], cfg: Config, shape: ModelSpec) -> list[LedgerRow]:
    """The ledger of `records` beside sizing's prediction for `cfg`, one row per ledger phase."""
    predicted = predicted_actor_ledger(cfg, shape)

    def most(key: str) -> float | None:
        values = [float(r[key]) for r in records if r.get(key) is not None]
        return max(values) if values else None

    return [
        LedgerRow(
            phase=phase,
            actor_bytes=most(f"memory/{phase}/actor_bytes"),
            predicted_bytes=predicted[phase],
            device_peak_bytes=most(f"memory/{phase}/device_peak_bytes"),
        )
        for phase in LEDGER_PHASES
    ]


@dataclass
class RunBreakdown:
    run_dir: str
    model: str
    device: str
    world_size: int
    peak_tflops: float | None
    """Peak TFLOP/s of one device; None: MFU is not reported (CPU runs without --peak-tflops)."""
    skip_first: int
    prompt_tokens_source: str
    steps: list[StepBreakdown]
    mean_seconds: dict[str, float] = field(default_factory=dict)
    shares: dict[str, float] = field(default_factory=dict)
    """Of the wall time, per column (they sum to 1)."""
    genrm_busy_share: float = 0.0
    """The judge's busy time over wall time: it overlaps the columns when verdicts stream, so it is not one."""
    throughput: dict[str, float] = field(default_factory=dict)
    flops_per_token: dict[str, float] = field(default_factory=dict)
    mfu: dict[str, float | None] = field(default_factory=dict)
    measured: dict[str, float] = field(default_factory=dict)
    """Numbers the cost model takes (its CostAssumptions field names), measured on this run."""
    memory: list[LedgerRow] = field(default_factory=list)
    """Per ledger phase: the actor's bytes on the device as logged, beside sizing's prediction."""

    @property
    def mean_wall_seconds(self) -> float:
        return sum(s.wall_seconds for s in self.steps) / len(self.steps)

    def to_json(self) -> dict:
        out = asdict(self)
        out["mean_wall_seconds"] = self.mean_wall_seconds
        return out


def step_breakdown(record: dict, cfg: Config, prompt_tokens_of=None) -> StepBreakdown:
    """One metrics.jsonl record as a breakdown; a record without the trainer's timing keys is an error.

    `prompt_tokens_of(step, kept_sequences)` gives the step's prompt tokens (None: left out).
    """
    step = record.get("step", "?")
    for key in ("perf/step_seconds", "perf/tokens_per_second"):
        if record.get(key) is None:
            raise ValueError(f"metrics.jsonl step {step}: no {key!r} (not a training step record of fapo-megatron)")
    seconds = {name: float(record.get(f"time/{name}") or 0.0) for name in TIMED}
    busy = float(record.get("time/genrm") or 0.0)
    if record.get("time/genrm_visible") is None:
        seconds["genrm_visible"] = busy
    seconds["val_ckpt"] = float(record.get("time/validation") or 0.0) + float(record.get("time/checkpoint") or 0.0)
    train_seconds = float(record["perf/step_seconds"])
    timed = sum(seconds.values())
    wall = max(train_seconds + seconds["val_ckpt"], timed)
    seconds["idle"] = wall - timed
    kept_prompts = cfg.data.batch_size - float(record.get("data/prompts_too_long") or 0.0)
    sequences = kept_prompts * cfg.rollout.n - float(record.get("reward/num_dropped") or 0.0)
    return StepBreakdown(
        step=int(record["step"]),
        seconds=seconds,
        wall_seconds=wall,
        response_tokens=float(record["perf/tokens_per_second"]) * train_seconds,
        prompt_tokens=prompt_tokens_of(int(record["step"]), sequences) if prompt_tokens_of else 0.0,
        sequences=sequences,
        genrm_busy_seconds=busy,
        genrm_asked=float(record.get("genrm/asked") or 0.0),
        genrm_output_tokens=float(record.get("genrm/output_tokens") or 0.0),
        accuracy=float(record.get("reward/accuracy") or 0.0),
        weight_sync_bytes=float(record.get("weight_sync/bytes") or 0.0),
    )


def summarize(run: RunBreakdown, shape: ModelSpec, cfg: Config) -> RunBreakdown:
    """Fill the run-level numbers from `run.steps` (time-weighted over the steps)."""
    steps, world = run.steps, run.world_size
    num = len(steps)
    wall = sum(s.wall_seconds for s in steps)
    run.mean_seconds = {c: sum(s.seconds[c] for s in steps) / num for c in COLUMNS}
    run.shares = {c: sum(s.seconds[c] for s in steps) / wall for c in COLUMNS}
    run.mean_seconds["genrm_busy"] = sum(s.genrm_busy_seconds for s in steps) / num
    run.genrm_busy_share = sum(s.genrm_busy_seconds for s in steps) / wall
    response = sum(s.response_tokens for s in steps)
    actor_tokens = sum(s.response_tokens + s.prompt_tokens for s in steps)
    sequences = sum(s.sequences for s in steps)
    seq_len = actor_tokens / sequences if sequences else 0.0
    run.flops_per_token = {
        "mean_sequence_tokens": seq_len,
        "update": train_flops_per_token(shape, seq_len) * cfg.algorithm.ppo_epochs,
        "logprobs": forward_flops_per_token(shape, seq_len),
    }
    rollout_s = sum(s.seconds["rollout"] for s in steps)
    genrm_s = sum(s.genrm_busy_seconds for s in steps)
    genrm_out = sum(s.genrm_output_tokens for s in steps)
    run.throughput = {
        "response_tokens_per_s": response / wall,
        "response_tokens_per_s_per_device": response / wall / world,
        "actor_tokens_per_step": actor_tokens / num,
        "rollout_tokens_per_s_per_device": response / rollout_s / world if rollout_s else 0.0,
        "genrm_output_tokens_per_s": genrm_out / genrm_s if genrm_s else 0.0,
    }
    update_s = sum(s.seconds["update"] for s in steps)
    logprob_s = sum(s.seconds["logprobs"] for s in steps)
    update_flops = actor_tokens * run.flops_per_token["update"]
    logprob_flops = actor_tokens * run.flops_per_token["logprobs"]
    peak = run.peak_tflops
    run.mfu = {
        "update": mfu(update_flops, update_s, world, peak) if peak else None,
        "logprobs": mfu(logprob_flops, logprob_s, world, peak) if peak else None,
        "actor": mfu(update_flops + logprob_flops, update_s + logprob_s, world, peak) if peak else None,
    }
    run.measured = _measured(run, steps, cfg, seq_len)
    return run


def _measured(run: RunBreakdown, steps: list[StepBreakdown], cfg: Config, seq_len: float) -> dict[str, float]:
    sequences = sum(s.sequences for s in steps)
    asked = sum(s.genrm_asked for s in steps)
    sync_s = sum(s.seconds["weight_sync"] for s in steps)
    out = {
        "accuracy": sum(s.accuracy for s in steps) / len(steps),
        "response_tokens_mean": sum(s.response_tokens for s in steps) / sequences if sequences else 0.0,
        "rollout_tokens_per_s_per_gpu": run.throughput["rollout_tokens_per_s_per_device"],
    }
    if run.prompt_tokens_source != "none":
        out["prompt_tokens_mean"] = sum(s.prompt_tokens for s in steps) / sequences if sequences else 0.0
    if sync_s > 0:
        out["weight_sync_gb_per_s"] = sum(s.weight_sync_bytes for s in steps) / sync_s / 1e9
    if run.mfu["update"]:
        out["actor_mfu"] = run.mfu["update"]
        out["logprob_mfu"] = run.mfu["logprobs"]
    genrm_out = sum(s.genrm_output_tokens for s in steps)
    if asked and genrm_out:
        out["genrm_output_tokens_mean"] = genrm_out / asked
        devices = cfg.cluster.genrm_devices if cfg.genrm.placement == "separate" else run.world_size
        out["genrm_tokens_per_s_per_gpu"] = run.throughput["genrm_output_tokens_per_s"] / max(devices, 1)
    return out


def policy_shape(cfg: Config) -> ModelSpec:
    """The actor's shape: model.path's config.json, the random tiny model when model.path is empty, else
    sizing.model_shape."""
    if not cfg.model.path:
        return model_spec(tiny_hf_config(cfg.model.tiny), f"tiny {cfg.model.tiny}")
    return resolve_shape(cfg.model.path, cfg.sizing.model_shape, "sizing.model_shape")


def breakdown_run(
    run_dir: str | Path,
    *,
    skip_first: int = 1,
    peak_tflops: float | None = None,
    prompt_tokens_mean: float | None = None,
    replay: bool = True,
) -> RunBreakdown:
    """Breakdown of RUN_DIR (config.yaml + metrics.jsonl), leaving out its first `skip_first` steps (warm-up).

    `peak_tflops` None: 989 on cuda runs, MFU not reported on cpu runs. `prompt_tokens_mean` (per sequence)
    overrides the replay; `replay` False with no logged prompt tokens leaves prompt tokens out.
    """
    run_dir = Path(run_dir)
    for name in ("config.yaml", "metrics.jsonl"):
        if not (run_dir / name).is_file():
            raise ConfigError(f"{run_dir / name}: not found (is {run_dir} a fapo-megatron run folder?)")
    cfg = load_config(run_dir / "config.yaml")
    records = read_metrics(run_dir / "metrics.jsonl")
    if len(records) <= skip_first:
        raise ConfigError(
            f"{run_dir / 'metrics.jsonl'}: {len(records)} steps, none left after --skip-first {skip_first}"
        )
    prompt_tokens, source = _prompt_tokens(records, cfg, prompt_tokens_mean, replay)
    if peak_tflops is None and cfg.cluster.device == "cuda":
        peak_tflops = DEFAULT_GPU_PEAK_TFLOPS
    steps = [step_breakdown(r, cfg, prompt_tokens) for r in records[skip_first:]]
    shape = policy_shape(cfg)
    run = RunBreakdown(
        run_dir=str(run_dir),
        model=shape.name,
        device=cfg.cluster.device,
        world_size=cfg.cluster.world_size,
        peak_tflops=peak_tflops,
        skip_first=skip_first,
        prompt_tokens_source=source,
        steps=steps,
        memory=memory_ledger(records[skip_first:], cfg, shape),
    )
    return summarize(run, shape, cfg)


def _prompt_tokens(records: list[dict], cfg: Config, mean: float | None, replay: bool):
    """(prompt_tokens_of(step, kept_sequences) or None, where the numbers come from)."""
    if mean is not None:
        return (lambda step, seqs: mean * seqs), f"given mean {mean:g} per sequence"
    logged = {r["step"]: r.get("perf/prompt_tokens") for r in records}
    if all(v is not None for v in logged.values()):
        return (lambda step, seqs: float(logged[step])), "logged"
    if not replay:
        return None, "none"
    from fapo_megatron.bench.replay import replay_prompt_tokens

    per_step = replay_prompt_tokens(cfg, max(logged))
    full = cfg.data.batch_size * cfg.rollout.n
    # The replay counts every rollout of the kept prompts; rollouts the reward policy dropped leave in proportion.
    return (lambda step, seqs: per_step[step - 1] * min(seqs / full, 1.0)), "replayed prompt sampler"


def format_table(run: RunBreakdown) -> str:
    """The table `fapo-megatron bench breakdown` prints: seconds per phase per step, then the run's summary."""
    head = f"{'step':>6} " + " ".join(f"{c:>13}" for c in COLUMNS) + f" {'wall s':>9} {'genrm_busy':>11}"
    rows = [head]
    for s in run.steps:
        cells = " ".join(f"{s.seconds[c]:>13.3f}" for c in COLUMNS)
        rows.append(f"{s.step:>6} {cells} {s.wall_seconds:>9.3f} {s.genrm_busy_seconds:>11.3f}")
    cells = " ".join(f"{run.mean_seconds[c]:>13.3f}" for c in COLUMNS)
    rows.append(f"{'mean':>6} {cells} {run.mean_wall_seconds:>9.3f} {run.mean_seconds['genrm_busy']:>11.3f}")
    cells = " ".join(f"{100 * run.shares[c]:>12.1f}%" for c in COLUMNS)
    rows.append(f"{'share':>6} {cells} {'':>9} {100 * run.genrm_busy_share:>10.1f}%")
    t = run.throughput
    rows.append(
        f"model {run.model}, {run.device}, world size {run.world_size}; steps {run.steps[0].step}-"
        f"{run.steps[-1].step} (first {run.skip_first} skipped)"
    )
    rows.append(
        f"response tokens/s {t['response_tokens_per_s']:.1f} ({t['response_tokens_per_s_per_device']:.1f} per "
        f"device); rollout {t['rollout_tokens_per_s_per_device']:.1f} tokens/s per device; GenRM visible "
        f"{100 * run.shares['genrm_visible']:.1f} % of wall time, busy {100 * run.genrm_busy_share:.1f} %"
    )
    f = run.flops_per_token
    rows.append(
        f"actor: {t['actor_tokens_per_step']:.0f} tokens/step (prompt tokens: {run.prompt_tokens_source}), mean "
        f"sequence {f['mean_sequence_tokens']:.1f} tokens, {f['update'] / 1e9:.4g} GFLOP/token update, "
        f"{f['logprobs'] / 1e9:.4g} log-probs"
    )
    if run.peak_tflops:
        m = run.mfu
        rows.append(
            f"actor MFU vs {run.peak_tflops:g} TFLOP/s per device: update {_pct(m['update'])}, log-probs "
            f"{_pct(m['logprobs'])}, both {_pct(m['actor'])}"
        )
    else:
        rows.append("actor MFU: n/a (cpu run; pass --peak-tflops to rate it against a peak)")
    rows.extend(format_memory(run.memory))
    return "\n".join(rows)


def format_memory(memory: list[LedgerRow]) -> list[str]:
    """The ledger rows of the table: measured actor bytes, `slurm size`'s, their ratio, the CUDA peak."""
    rows = [f"{'memory':<12} {'actor (ledger)':>15} {'slurm size':>15} {'ratio':>7} {'device peak':>15}"]
    for row in memory:
        ratio = row.actor_bytes / row.predicted_bytes if row.actor_bytes is not None and row.predicted_bytes else None
        rows.append(
            f"{row.phase:<12} {_size(row.actor_bytes):>15} {_size(row.predicted_bytes):>15} "
            f"{'-' if ratio is None else f'{ratio:.3f}':>7} {_size(row.device_peak_bytes):>15}"
        )
    return rows


def _size(num_bytes: float | None) -> str:
    if num_bytes is None:
        return "n/a"
    return f"{num_bytes / 1e9:.2f} GB" if num_bytes >= 1e9 else f"{num_bytes / 1e6:.3f} MB"


def _pct(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.2f} %"


def save_breakdown(run: RunBreakdown, out_dir: str | Path) -> tuple[Path, Path]:
    """breakdown.json and breakdown.png in `out_dir`."""
    from fapo_megatron.bench.plot import plot_breakdown

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "breakdown.json"
    json_path.write_text(json.dumps(run.to_json(), indent=2) + "\n")
    return json_path, plot_breakdown(run, out_dir / "breakdown.png")
