"""The demo's verdict: a per-step table of each run and the goals that say whether FAPO did what the paper says.

Goals (measured on the runs' metrics.jsonl): under outcome-only GRPO the flawed-positive share persists (last
WINDOW steps >= 60 % of the first WINDOW), under FAPO it falls (<= 40 %); FAPO's final clean validation
accuracy (correct and flawless) is at least GRPO's; and FAPO's run shows the learning-progress turn: rho =
clean / wrong crosses 1, and the share of flawed positives with a positive advantage is above one half before
the crossing and below one half after it (pooled over the flawed positives of those steps: a step with few
flawed positives says little).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from fapo_megatron.metrics import read_metrics

WINDOW = 10
"""Steps averaged at the start and at the end of a run."""
RHO_SMOOTHING = 3
"""Steps in the moving average of mean rho whose first value >= 1 is the crossing."""
COLUMNS = (
    ("reward/accuracy", "acc"),
    ("reward/flawed_positive_share", "flawed"),
    ("progress/mean_rho", "rho"),
    ("progress/flawed_positive_advantage_share", "adv>0"),
    ("response/length_mean", "len"),
    ("val/clean_accuracy", "val_clean"),
)


@dataclass(frozen=True)
class Goal:
    text: str
    measured: str
    passed: bool


def run_records(run_dir: str | Path) -> list[dict]:
    return read_metrics(Path(run_dir) / "metrics.jsonl")


def series(records: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in records if r.get(key) is not None and math.isfinite(r[key])]


def window_means(records: list[dict], key: str, window: int = WINDOW) -> tuple[float, float]:
    """Mean of `key` over the first and over the last `window` steps (validation: its first and last value)."""
    values = [v for _, v in series(records, key)]
    if not values:
        return math.nan, math.nan
    if key.startswith("val/"):
        return values[0], values[-1]
    return _mean(values[:window]), _mean(values[-window:])


def rho_crossing(records: list[dict]) -> int | None:
    """First step whose moving-average mean rho is >= 1, when the run starts below 1; else None."""
    points = series(records, "progress/mean_rho")
    smoothed = moving_average([v for _, v in points], RHO_SMOOTHING)
    if not smoothed or smoothed[0] >= 1.0:
        return None
    return next((points[i][0] for i, v in enumerate(smoothed) if v >= 1.0), None)


def goals(runs: dict[str, str | Path]) -> list[Goal]:
    """The demo's goals for the runs given (FAPO, and GRPO when compared)."""
    records = {label: run_records(path) for label, path in runs.items()}
    out = []
    for label, limit, keeps in (("GRPO", 0.6, True), ("FAPO", 0.4, False)):
        if label not in records:
            continue
        first, last = window_means(records[label], "reward/flawed_positive_share")
        ratio = last / first if first > 0 else math.nan
        text = f"{label} flawed share, last {WINDOW} / first {WINDOW} steps {'>=' if keeps else '<='} {limit}"
        passed = ratio >= limit if keeps else ratio <= limit
        out.append(Goal(text, f"{last:.3f} / {first:.3f} = {ratio:.2f}", bool(passed)))
    if {"FAPO", "GRPO"} <= records.keys():
        fapo, grpo = (_last(records[k], "val/clean_accuracy") for k in ("FAPO", "GRPO"))
        out.append(Goal("FAPO final clean val accuracy >= GRPO's", f"{fapo:.3f} vs {grpo:.3f}", bool(fapo >= grpo)))
    if "FAPO" in records:
        out.append(_turn_goal(records["FAPO"]))
    return out


def _turn_goal(records: list[dict]) -> Goal:
    text = "FAPO rho crosses 1; flawed positives with advantage > 0: > 0.5 before, < 0.5 after"
    crossing = rho_crossing(records)
    if crossing is None:
        return Goal(text, "rho does not cross 1 from below", False)
    before = pooled_advantage_share([r for r in records if r["step"] < crossing])
    after = pooled_advantage_share([r for r in records if r["step"] >= crossing])
    return Goal(text, f"crossing at step {crossing}: {before:.2f} before, {after:.2f} after", before > 0.5 > after)


def pooled_advantage_share(records: list[dict]) -> float:
    """Share of all the flawed positives of `records` with advantage > 0 (each step weighted by its count)."""
    key = "progress/flawed_positive_advantage_share"
    pairs = [
        (r[key], r.get("genrm/flawed") or 0.0) for r in records if r.get(key) is not None and math.isfinite(r[key])
    ]
    total = sum(count for _, count in pairs)
    return sum(share * count for share, count in pairs) / total if total else math.nan


def print_report(seeds: list[dict[str, str | Path]], every: int = 5) -> bool:
    """Print each run's table (every `every` steps) with its first/last-window means, then the goals of every seed
    (each seed's FAPO and GRPO runs start from the same policy); True when every seed met every goal."""
    for offset, runs in enumerate(seeds):
        for label, path in runs.items():
            _print_table(f"{label} seed {offset}", path, every)
    passed = True
    for offset, runs in enumerate(seeds):
        print(f"\ngoals, seed {offset}")
        for goal in goals(runs):
            passed &= goal.passed
            print(f"  [{'pass' if goal.passed else 'FAIL'}] {goal.text}: {goal.measured}")
    return passed


def _print_table(title: str, path: str | Path, every: int) -> None:
    records = run_records(path)
    print(f"\n{title} ({path})")
    print(f"{'step':>5}" + "".join(f"{name:>10}" for _, name in COLUMNS))
    for record in records:
        if record["step"] % every == 0 or record["step"] in (1, records[-1]["step"]):
            print(f"{record['step']:>5}" + "".join(f"{_cell(record.get(key)):>10}" for key, _ in COLUMNS))
    means = [window_means(records, key) for key, _ in COLUMNS]
    print(
        f"{'first':>5}"
        + "".join(f"{_cell(first):>10}" for first, _ in means)
        + f"   (mean of the first {WINDOW} steps; val: first value)"
    )
    print(
        f"{'last':>5}"
        + "".join(f"{_cell(last):>10}" for _, last in means)
        + f"   (mean of the last {WINDOW} steps; val: last value)"
    )


def moving_average(values, window: int) -> list[float]:
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1) : i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


def _last(records: list[dict], key: str) -> float:
    points = series(records, key)
    return points[-1][1] if points else math.nan


def _cell(value) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.3f}"
