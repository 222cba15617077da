"""GenRM client: asks a judge model about many solutions at once, within a concurrency limit and a deadline.

Every request gets exactly one verdict, in order. What could not be had is reported as such (timeout, error,
unavailable, unparseable) and counted; it is never turned into a "clean" verdict. Retries use exponential
backoff and stop at the deadline; every HTTP call is bounded as a whole (`http_deadline`), so `judge` returns by the
deadline even if the server hangs or trickles bytes (a streamed request sent before the wait began is bounded by
`request_timeout_s` and may finish in the background after `collect` returned).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Hashable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from fapo_megatron.genrm.prompt import build_genrm_messages, split_steps
from fapo_megatron.genrm.transports import Messages, Transport, TransportError, TransportRejected
from fapo_megatron.genrm.types import JudgeCounts, JudgeRequest, Verdict, VerdictStatus
from fapo_megatron.genrm.verdict import parse_verdict


@dataclass
class _Item:
    index: Hashable
    """The request's key (its position for `judge`, the caller's key for a stream)."""
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
        stream = self.open_stream()
        stream.start_deadline()  # every request is known now: each HTTP call is bounded by the deadline itself
        for index, request in enumerate(requests):
            stream.submit(index, request)
        verdicts = stream.collect()
        return [verdicts[index] for index in range(len(requests))]

    def open_stream(self) -> VerdictStream:
        """A stream to submit requests one at a time while the rollout still runs (see VerdictStream)."""
        return VerdictStream(self)

    def _deadline_verdict(self, item: _Item) -> Verdict:
        return Verdict(
            VerdictStatus.TIMEOUT, num_steps=item.num_steps, detail=f"batch deadline of {self.deadline_s:.1f}s passed"
        )

    def _call_with_retries(self, batch: list[_Item], deadline: _Deadline, stop: threading.Event) -> list[Verdict]:
        failure = _Failure(VerdictStatus.TIMEOUT, "deadline passed before the request was sent", 0)
        for attempt in range(self.retries + 1):
            remaining = deadline.remaining()
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
                stop.wait(min(self.backoff_s * 2**attempt, max(deadline.remaining(), 0.0)))
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


class _Deadline:
    """The step's bound on its verdicts: none while requests are still being submitted, `deadline_s` from the
    moment the step starts waiting (so the step never waits longer than it did when every request left at once)."""

    def __init__(self):
        self.at = math.inf

    def start(self, seconds: float) -> None:
        if math.isinf(self.at):  # started once: a later start does not extend it
            self.at = time.monotonic() + seconds

    @property
    def started(self) -> bool:
        return not math.isinf(self.at)

    def remaining(self) -> float:
        return self.at - time.monotonic()


class VerdictStream:
    """Verdicts of one step, asked for one request at a time as rollouts finish.

    `submit(key, request)` sends the request at once (within `concurrency`) when the transport takes parallel calls
    (HTTP); an in-process engine transport batches, so its requests wait for `collect`. `collect()` starts the
    deadline, waits for the tail and returns exactly one verdict per submitted key: what is not back by the
    deadline is a timeout verdict, never missing; a key submitted twice is an error. `busy_seconds` is the wall
    time during which at least one request was outstanding (the judge's busy time, logged as `time/genrm`).
    """

    def __init__(self, client: GenRMClient):
        self.client = client
        self.deadline = _Deadline()
        self._threads_bounded = False
        self.busy_seconds = 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._outstanding = 0
        self._busy_since = 0.0
        self._verdicts: dict = {}
        self._buffered: list[_Item] = []
        self._futures: dict[Future, list[_Item]] = {}
        self._keys: dict = {}
        """Submitted keys, in order (a dict for the membership test)."""
        self._collected = False
        workers = client.concurrency if client.transport.parallel_calls else 1
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="genrm")

    def submit(self, key, request: JudgeRequest) -> None:
        if self._collected:
            raise RuntimeError("VerdictStream.submit after collect(): open a new stream for the next step")
        if key in self._keys:
            raise ValueError(f"GenRM request {key!r} submitted twice; every rollout is judged once")
        self._keys[key] = None
        client = self.client
        steps = split_steps(request.solution, client.max_steps)
        if not steps:
            self._verdicts[key] = Verdict(VerdictStatus.ERROR, detail="empty solution: no steps to judge", attempts=0)
            return
        item = _Item(key, build_genrm_messages(request.problem, steps, request.ground_truth), len(steps))
        if client.transport.parallel_calls:
            self._dispatch([item])
        else:
            self._buffered.append(item)

    def start_deadline(self) -> None:
        """Start the deadline before submitting (`judge`): then every call is bounded by it, and `collect` waits for
        its threads, so none outlives the verdicts. A stream fed during the rollout starts it in `collect` instead,
        and calls sent before that are bounded by request_timeout_s only."""
        if self._futures or self._buffered:
            raise RuntimeError("start_deadline() must come before the first submit")
        self.deadline.start(self.client.deadline_s)
        self._threads_bounded = self.client.transport.parallel_calls  # HTTP calls end by their deadline; an
        # in-process engine cannot be interrupted, so its call may outlive the verdicts (as before)

    def collect(self) -> dict:
        """{key: verdict} for every submitted key, returned by the deadline (counted into the client's counts)."""
        if self._collected:
            raise RuntimeError("VerdictStream.collect() called twice")
        self._collected = True
        client = self.client
        self.deadline.start(client.deadline_s)
        for start in range(0, len(self._buffered), client.concurrency):
            self._dispatch(self._buffered[start : start + client.concurrency])
        pending = set(self._futures)
        while pending:
            remaining = self.deadline.remaining()
            if remaining <= 0:
                break
            done, pending = wait(pending, timeout=remaining, return_when=FIRST_COMPLETED)
            for future in done:
                for item, verdict in zip(self._futures[future], future.result()):
                    self._verdicts[item.index] = verdict
        self._stop.set()
        self._executor.shutdown(wait=self._threads_bounded, cancel_futures=True)
        for future in pending:
            for item in self._futures[future]:
                self._verdicts[item.index] = client._deadline_verdict(item)
        with self._lock:
            if self._outstanding:
                self.busy_seconds += time.monotonic() - self._busy_since
                self._outstanding = 0
        verdicts = {key: self._verdicts[key] for key in self._keys}
        client.last_counts = JudgeCounts.from_verdicts(list(verdicts.values()))
        client.total_counts.merge(client.last_counts)
        return verdicts

    def _dispatch(self, batch: list[_Item]) -> None:
        with self._lock:
            if self._outstanding == 0:
                self._busy_since = time.monotonic()
            self._outstanding += 1
        future = self._executor.submit(self.client._call_with_retries, batch, self.deadline, self._stop)
        self._futures[future] = batch
        future.add_done_callback(self._done)

    def _done(self, future: Future) -> None:
        with self._lock:
            if self._outstanding == 0:  # collect() already closed the books on a call cut by the deadline
                return
            self._outstanding -= 1
            if self._outstanding == 0:
                self.busy_seconds += time.monotonic() - self._busy_since
