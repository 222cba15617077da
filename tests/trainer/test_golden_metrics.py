"""Golden metrics: configs/tiny_cpu.yaml for 3 steps (fixed seeds) reproduces the committed step metrics exactly.

Two runs of this command on the same machine give bit-identical metrics (everything but wall-clock time), and so
did the tree before the import/role-group refactor, so the comparison is exact: any change to what a step
computes (sampling, rewards, advantages, log-probs, the update, validation) shows up here as a named key.
Only wall-clock keys (`time/*`, `perf/step_seconds`, `perf/tokens_per_second`) are left out.

Regenerate, only when a change is meant to alter the numbers and with the reason in the commit message:

    FAPO_REGENERATE_GOLDEN=1 .venv/bin/python -m pytest tests/trainer/test_golden_metrics.py
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fapo_megatron.metrics import METRICS_FILE, read_metrics

REPO = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).with_name("golden_tiny_cpu.jsonl")
OVERRIDES = [
    "trainer.steps=3",
    "trainer.val_interval=3",  # the last step validates, so validation is covered too
    "data.batch_size=4",  # smaller than the demo's 16 to keep the test near half a minute
    "algorithm.mini_batch_size=2",
    "trainer.progress=false",
]
WALL_CLOCK = ("time/", "perf/step_seconds", "perf/tokens_per_second")
pytestmark = pytest.mark.timeout(900)


def deterministic(row: dict) -> dict:
    return {key: value for key, value in row.items() if not key.startswith(WALL_CLOCK)}


def test_tiny_cpu_metrics_equal_the_golden_file(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fapo_megatron", "train", "configs/tiny_cpu.yaml", f"trainer.output_dir={tmp_path}"]
        + OVERRIDES,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=800,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    rows = [deterministic(row) for row in read_metrics(tmp_path / METRICS_FILE)]
    if os.environ.get("FAPO_REGENERATE_GOLDEN") == "1":
        GOLDEN.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))
    golden = [json.loads(line) for line in GOLDEN.read_text().splitlines()]
    assert [row["step"] for row in rows] == [row["step"] for row in golden] == [1, 2, 3]
    for row, expected in zip(rows, golden):
        assert sorted(row) == sorted(expected), f"step {row['step']}: metric keys differ from {GOLDEN.name}"
        changed = {
            key: (expected[key], row[key])
            for key in expected
            if not (row[key] == expected[key] or _both_nan(row[key], expected[key]))
        }
        assert not changed, f"step {row['step']}: (golden, now) {changed}"


def _both_nan(a, b) -> bool:
    return all(v is None or (isinstance(v, float) and math.isnan(v)) for v in (a, b))
