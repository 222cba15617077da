"""Step metrics: phase timers, TensorBoard scalars and a JSONL file, one record per training step.

Every scalar the trainer produces goes to both sinks under the same name (`train/accuracy`,
`time/rollout`, ...), so a plot script and TensorBoard read the same numbers.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
PHASES = ("rollout", "genrm_visible", "logprobs", "update", "weight_sync", "validation", "checkpoint")
"""Timed phases of one step, in the order they run. `genrm_visible` is the wall time the step waited for verdicts;
`time/genrm` beside it is the judge's busy time (wall time with at least one request in flight), which may
overlap the rollout and the log-prob pass when verdicts stream."""


class PhaseTimer:
    """Wall-clock seconds per phase of the current step (`with timer.phase("rollout"): ...`)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def add(self, name: str, seconds: float) -> None:
        """Account time measured elsewhere (e.g. the judge's busy time, measured by the judge)."""
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def reset(self) -> dict[str, float]:
        seconds, self.seconds = self.seconds, {}
        return seconds


def to_float(value) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().mean().item())
    return float(value)


class MetricsLogger:
    """Writes `{name: value}` per step to TensorBoard (output_dir/tensorboard) and output_dir/metrics.jsonl.

    On resume at step k (k steps done and checkpointed), records of later steps are dropped from metrics.jsonl and
    TensorBoard, so a step re-run after a crash never appears twice.
    """

    def __init__(self, output_dir: str | Path, *, resume_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.tensorboard_dir = self.output_dir / TENSORBOARD_DIR
        self.jsonl_path = self.output_dir / METRICS_FILE
        self._truncate_after(resume_step)
        self._writer = SummaryWriter(
            log_dir=str(self.tensorboard_dir), purge_step=resume_step + 1 if resume_step else None
        )
        self._jsonl = self.jsonl_path.open("a")

    def _truncate_after(self, resume_step: int) -> None:
        if not self.jsonl_path.exists():
            return
        kept = [json.dumps(r) for r in read_metrics(self.jsonl_path) if r["step"] <= resume_step]
        self.jsonl_path.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        record = {"step": step}
        for name, value in metrics.items():
            value = to_float(value)
            record[name] = value if math.isfinite(value) else None
            if math.isfinite(value):
                self._writer.add_scalar(name, value, step)
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        self._writer.flush()

    def close(self) -> None:
        self._jsonl.close()
        self._writer.close()


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl file, in step order. A torn last line (a kill mid-write) is left out, with a
    warning naming the file; a bad line elsewhere raises ValueError naming file and line."""
    path = Path(path)
    lines = path.read_text(errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            if number == len(lines):
                logger.warning("%s:%d: torn last line left out (%s)", path, number, err)
                continue
            raise ValueError(f"{path}:{number}: not a metrics record ({err})") from None
        records.append({**record, "step": step})
    return sorted(records, key=lambda r: r["step"])
