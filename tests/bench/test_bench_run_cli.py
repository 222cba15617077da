"""`fapo-megatron bench run` end to end on CPU: a short real training run (tiny random policy, 2 gloo ranks,
local Ray), then its breakdown, checked against the run's own metrics."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fapo_megatron.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "tiny_cpu.yaml"
pytestmark = pytest.mark.timeout(600)


def test_bench_run_trains_then_breaks_down(tmp_path):
    out = tmp_path / "run"
    overrides = [
        "trainer.progress=false",
        "data.batch_size=4",
        "algorithm.mini_batch_size=2",
        "parallel.micro_batch_size=4",
        "data.arith_num_val=0",
    ]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fapo_megatron",
            "bench",
            "run",
            str(CONFIG),
            *overrides,
            "--steps",
            "3",
            "--output-dir",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=540,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "share" in proc.stdout and "actor MFU: n/a" in proc.stdout
    records = {r["step"]: r for r in read_metrics(out / "metrics.jsonl")}
    assert sorted(records) == [1, 2, 3]
    saved = json.loads((out / "bench" / "breakdown.json").read_text())
    assert [s["step"] for s in saved["steps"]] == [2, 3]
    assert sum(saved["shares"].values()) == pytest.approx(1.0)
    for step in saved["steps"]:
        record = records[step["step"]]
        assert step["wall_seconds"] >= record["perf/step_seconds"]
        assert step["seconds"]["rollout"] == record["time/rollout"]
        # response tokens from tokens/s x seconds match the logged mean length x kept rollouts (4 prompts x 8)
        kept = 4 * 8 - record["reward/num_dropped"]
        assert step["response_tokens"] == pytest.approx(record["response/length_mean"] * kept, rel=1e-6)
        assert step["prompt_tokens"] > 0
    assert (out / "bench" / "breakdown.png").stat().st_size > 0
