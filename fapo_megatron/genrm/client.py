"""GenRM client: asks a judge model about many solutions at once, within a concurrency limit and a deadline.

Every request gets exactly one verdict, in order. What could not be had is reported as such (timeout, error,
unavailable, unparseable) and counted; it is never turned into a "clean" verdict. Retries use exponential
backoff and stop at the deadline; every HTTP call is bounded as a whole (`http_deadline`), so `judge` returns by the
deadline, with no thread left behind, even if the server hangs or trickles bytes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from fapo_megatron.genrm.prompt import build_genrm_messages, split_steps
from fapo_megatron.genrm.transports import Messages, Transport, TransportError, TransportRejected
from fapo_megatron.genrm.types import JudgeCounts, JudgeRequest, Verdict, VerdictStatus
from fapo_megatron.genrm.verdict import parse_verdict


@dataclass
class _Item:
    index: int
    messages: Messages
    num_steps: int


@dataclass
class _Failure:
    status: VerdictStatus
    detail: str
    attempts: int


class GenRMClient:
    """Judge solutions with a GenRM behind `transport` (see `genrm.transports`)."""

    def __init__(
        self,
        transport: Transport,
        *,
        max_steps: int = 32,
        concurrency: int = 64,
        request_timeout_s: float = 600.0,
        deadline_s: float = 1800.0,
        retries: int = 2,
        backoff_s: float = 1.0,
    ):
        if concurrency < 1 or max_steps < 1 or retries < 0:
            raise ValueError(f"concurrency={concurrency}, max_steps={max_steps} must be >= 1, retries={retries} >= 0")
        if request_timeout_s <= 0 or deadline_s <= 0 or backoff_s < 0:
            raise ValueError(f"request_timeout_s={request_timeout_s}, deadline_s={deadline_s} must be > 0")
        self.transport = transport
        self.max_steps, self.concurrency, self.retries, self.backoff_s = max_steps, concurrency, retries, backoff_s
        self.request_timeout_s, self.deadline_s = request_timeout_s, deadline_s
        self.total_counts = JudgeCounts()
        """Counts over every `judge` call of this client."""
        self.last_counts = JudgeCounts()
        """Counts of the latest `judge` call."""

    def judge(self, requests: Sequence[JudgeRequest]) -> list[Verdict]:
        """One verdict per request, in order, returned by the deadline."""
        deadline = time.monotonic() + self.deadline_s
        verdicts: list[Verdict | None] = [None] * len(requests)
        items = []
        for index, request in enumerate(requests):
            steps = split_steps(request.solution, self.max_steps)
            if not steps:
                verdicts[index] = Verdict(VerdictStatus.ERROR, detail="empty solution: no steps to judge", attempts=0)
                continue
            messages = build_genrm_messages(request.problem, steps, request.ground_truth)
            items.append(_Item(index, messages, len(steps)))
        for item, verdict in zip(items, self._run(items, deadline)):
            verdicts[item.index] = verdict
        self.last_counts = JudgeCounts.from_verdicts(verdicts)
        self.total_counts.merge(self.last_counts)
        return verdicts

    def _run(self, items: list[_Item], deadline: float) -> list[Verdict]:
        """Send `items` in calls of the transport's batch shape; what is not back by the deadline times out."""
        batch_size = 1 if self.transport.parallel_calls else self.concurrency
        workers = self.concurrency if self.transport.parallel_calls else 1
        batches = [items[start : start + batch_size] for start in range(0, len(items), batch_size)]
        results: dict[int, list[Verdict]] = {}
        stop = threading.Event()
        executor = ThreadPoolExecutor(max_workers=max(1, min(workers, len(batches))), thread_name_prefix="genrm")
        futures: dict[Future, int] = {
            executor.submit(self._call_with_retries, batch, deadline, stop): number
            for number, batch in enumerate(batches)
        }
        pending = set(futures)
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            done, pending = wait(pending, timeout=remaining, return_when=FIRST_COMPLETED)
            for future in done:
                results[futures[future]] = future.result()
        stop.set()
        # HTTP calls end by their whole-request deadline (<= the batch deadline), so waiting for them is bounded and
        # no thread outlives `judge`; an in-process engine cannot be interrupted, its call finishes on its own.
        executor.shutdown(wait=self.transport.parallel_calls, cancel_futures=True)
        verdicts = []
        for number, batch in enumerate(batches):
            verdicts.extend(results.get(number) or [self._deadline_verdict(item) for item in batch])
        return verdicts

    def _deadline_verdict(self, item: _Item) -> Verdict:
        return Verdict(
            VerdictStatus.TIMEOUT, num_steps=item.num_steps, detail=f"batch deadline of {self.deadline_s:.1f}s passed"
        )

    def _call_with_retries(self, batch: list[_Item], deadline: float, stop: threading.Event) -> list[Verdict]:
        failure = _Failure(VerdictStatus.TIMEOUT, "deadline passed before the request was sent", 0)
        for attempt in range(self.retries + 1):
            remaining = deadline - time.monotonic()
            if stop.is_set() or remaining <= 0:
                break
            try:
                timeout_s = min(self.request_timeout_s, remaining)
                answers = self.transport.complete([item.messages for item in batch], timeout_s)
                if len(answers) != len(batch):
                    raise TransportRejected(f"transport gave {len(answers)} answers for {len(batch)} prompts")
            except TransportError as err:
                failure = _Failure(err.status, str(err), attempt + 1)
                if not err.retryable:
                    break
                stop.wait(min(self.backoff_s * 2**attempt, max(deadline - time.monotonic(), 0.0)))
                continue
            except Exception as err:  # noqa: BLE001 - a judge bug must become a counted error, not a crashed step
                failure = _Failure(VerdictStatus.ERROR, f"{type(err).__name__}: {err}", attempt + 1)
                break
            verdicts = [
                parse_verdict(a.text, item.num_steps, output_tokens=a.output_tokens) for item, a in zip(batch, answers)
            ]
            for verdict in verdicts:
                verdict.attempts = attempt + 1
            return verdicts
        return [
            Verdict(failure.status, num_steps=item.num_steps, detail=failure.detail, attempts=failure.attempts)
            for item in batch
        ]
