"""What the tiny_cpu benchmarks share: one `fapo-megatron train` process per mode, and means over its steps."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fapo_megatron.metrics import read_metrics  # noqa: E402


def train_tiny(out: Path, steps: int, batch_size: int, overrides: list[str], label: str) -> list[dict]:
    """Train configs/tiny_cpu.yaml into `out` (no validation, no checkpoints) in a process of its own; its metrics."""
    command = [
        sys.executable,
        "-m",
        "fapo_megatron",
        "train",
        str(REPO / "configs" / "tiny_cpu.yaml"),
        f"trainer.output_dir={out}",
        f"trainer.steps={steps}",
        "trainer.val_interval=0",
        "trainer.checkpoint_interval=0",
        "trainer.progress=false",
        f"data.batch_size={batch_size}",
        "algorithm.mini_batch_size=2",
        *overrides,
    ]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"train ({label}) failed:\n{proc.stderr[-4000:]}")
    return read_metrics(out / "metrics.jsonl")


def mean_after_first(records: list[dict], key: str, missing: float | None = None) -> float:
    """Mean of `key` over the steps after the first, which pays one-time costs (first forward passes, thread pools).

    A step without `key` counts as `missing`; with missing=None it is an error (the metric should be there).
    """
    timed = records[1:]
    if missing is None:
        absent = [r["step"] for r in timed if key not in r]
        if absent:
            raise SystemExit(f"metric {key!r} missing at steps {absent}")
    return sum(r.get(key, missing) for r in timed) / len(timed)
