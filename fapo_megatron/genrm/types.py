"""What every judge takes and gives back: requests, verdicts, their status, and the counts a trainer logs.

A judge (the GenRM client or the program step checker) answers one `Verdict` per `JudgeRequest`, in order.
`first_error_step` is the index (from 0) of the earliest wrong step of the solution as split by
`genrm.prompt.split_steps`, or -1 when every step is right. A verdict whose status is not `ok` carries no
judgement at all: it is never to be read as "clean" (the unavailable-verdict policy is applied in
`fapo_megatron.algo.rewards.fapo_rewards`).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

import torch


class VerdictStatus(str, enum.Enum):
    OK = "ok"
    """A valid index came back (-1 or 0..num_steps-1)."""
    UNPARSEABLE = "unparseable"
    """An answer came back but it holds no valid index (no box, not an integer, out of range)."""
    TIMEOUT = "timeout"
    """No answer before the per-request timeout or the batch deadline."""
    ERROR = "error"
    """The judge answered with an error (HTTP error status, malformed response, engine or checker failure)."""
    UNAVAILABLE = "unavailable"
    """The judge could not be reached at all (connection refused or dropped)."""


@dataclass(frozen=True)
class JudgeRequest:
    problem: str
    """The question as the policy saw it."""
    solution: str
    """The policy's full response; the judge splits it into steps."""
    ground_truth: str
    """The reference final answer."""


@dataclass
class Verdict:
    status: VerdictStatus
    """Whether `first_error_step` holds a judgement."""
    first_error_step: int | None = None
    """Earliest wrong step (from 0), -1 when all steps are right, None unless status is ok."""
    num_steps: int = 0
    """Steps the solution was split into (the valid index range is -1 .. num_steps - 1)."""
    raw_text: str = ""
    """The judge's output (model text, or the checker's note), kept for logs and debugging."""
    output_tokens: int = 0
    """Tokens the judge generated (0 for the program checker or when unknown)."""
    detail: str = ""
    """Why a verdict is not ok (the error message, the HTTP status, ...)."""
    attempts: int = 1
    """Calls made for this verdict (1 + retries); 0 when it was never sent (the deadline had passed)."""

    def __post_init__(self):
        ok = self.status == VerdictStatus.OK
        if ok != (self.first_error_step is not None):
            raise ValueError(f"verdict status {self.status.value} with first_error_step={self.first_error_step}")
        if ok and not -1 <= self.first_error_step < self.num_steps:
            raise ValueError(f"first_error_step={self.first_error_step} outside -1..{self.num_steps - 1}")

    @property
    def flawed(self) -> bool | None:
        """True: some step is wrong; False: all steps right; None: no judgement (status not ok)."""
        if self.first_error_step is None:
            return None
        return self.first_error_step != -1

    @property
    def available(self) -> bool:
        return self.status == VerdictStatus.OK


@dataclass
class JudgeCounts:
    """Per-batch (or cumulative) outcome counts; asked = flawed + clean + the five kinds of missing verdict."""

    asked: int = 0
    flawed: int = 0
    clean: int = 0
    unparseable: int = 0
    timed_out: int = 0
    errors: int = 0
    unavailable: int = 0
    retries: int = 0
    """Calls beyond the first, over all requests."""
    output_tokens: int = 0

    @classmethod
    def from_verdicts(cls, verdicts: Sequence[Verdict]) -> JudgeCounts:
        counts = cls()
        for verdict in verdicts:
            counts.add(verdict)
        return counts

    def add(self, verdict: Verdict) -> None:
        self.asked += 1
        self.output_tokens += verdict.output_tokens
        self.retries += max(verdict.attempts - 1, 0)
        if verdict.status == VerdictStatus.OK:
            if verdict.flawed:
                self.flawed += 1
            else:
                self.clean += 1
        elif verdict.status == VerdictStatus.UNPARSEABLE:
            self.unparseable += 1
        elif verdict.status == VerdictStatus.TIMEOUT:
            self.timed_out += 1
        elif verdict.status == VerdictStatus.ERROR:
            self.errors += 1
        else:
            self.unavailable += 1

    def merge(self, other: JudgeCounts) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)

    @property
    def missing(self) -> int:
        """Requests without a judgement (unparseable, timed out, errors, unavailable)."""
        return self.unparseable + self.timed_out + self.errors + self.unavailable

    def as_metrics(self, prefix: str = "genrm/") -> dict[str, float]:
        """Flat metrics for the trainer's logger, with the flawed share among judged requests (NaN when none was
        judged: an undefined share must not read as a clean batch)."""
        metrics = {f"{prefix}{name}": float(value) for name, value in asdict(self).items()}
        judged = self.flawed + self.clean
        metrics[f"{prefix}flawed_share"] = self.flawed / judged if judged else math.nan
        metrics[f"{prefix}missing"] = float(self.missing)
        return metrics


def verdict_tensors(verdicts: Sequence[Verdict]) -> tuple[torch.Tensor, torch.Tensor]:
    """(flawed, available) bool tensors for `algo.rewards.fapo_rewards`; flawed is False where unavailable."""
    flawed = torch.tensor([bool(v.flawed) for v in verdicts], dtype=torch.bool)
    available = torch.tensor([v.available for v in verdicts], dtype=torch.bool)
    return flawed, available


class Judge(Protocol):
    """The interface the trainer uses: one verdict per request, in order, never raising for a bad answer."""

    def judge(self, requests: Sequence[JudgeRequest]) -> list[Verdict]: ...
