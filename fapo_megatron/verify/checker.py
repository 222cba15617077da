"""Batch answer checking in worker processes, with a per-case time limit and crash recovery.

math-verify can spend minutes in sympy on adversarial answers, and its SIGALRM timeout does not work off the
main thread. So cases the normaliser cannot settle go to a small pool of worker processes, one case at a time
per worker; a case that runs past `timeout_s` has its worker killed and replaced and is scored wrong
(counted in `num_timeouts`). A worker that dies mid-case is replaced and the case retried once; a second death
scores it wrong (counted in `num_crashes`).
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

from fapo_megatron.lifetime import exit_with_parent
from fapo_megatron.verify.equivalence import answers_match, quick_verdict
from fapo_megatron.verify.extract import extract_boxed

_MAX_ATTEMPTS = 2
_READY = "ready"
_STARTUP_TIMEOUT_S = 120.0


def _worker_main(conn: Connection, parent_pid: int) -> None:
    """Warm up (imports sympy and math-verify), say so, then serve (index, pred, gold) until the pipe closes or the
    parent dies (a case stuck in sympy would not notice the closed pipe)."""
    exit_with_parent(parent_pid)
    answers_match("\\frac{1}{2}", "x = 0.5")
    conn.send(_READY)
    while True:
        try:
            index, pred, gold = conn.recv()
        except (EOFError, OSError):
            return
        conn.send((index, answers_match(pred, gold)))


@dataclass
class _Worker:
    process: multiprocessing.process.BaseProcess
    conn: Connection
    index: int | None = None
    """The case it is working on (None when idle)."""
    started: float = 0.0
    """time.monotonic() at which it got that case."""
    ready: bool = False
    """Whether it has finished its start-up."""


class AnswerChecker:
    """Grades responses against gold answers; `check` returns one bool per response.

    The final answer is the last box of each response (`tail_chars` limits the search to the response's end).
    Use as a context manager, or call `close()`, to stop the workers.
    """

    def __init__(self, num_workers: int = 2, timeout_s: float = 5.0, tail_chars: int | None = None):
        if num_workers < 1:
            raise ValueError(f"num_workers={num_workers}: need at least one worker process")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s={timeout_s}: must be > 0")
        self.num_workers = num_workers
        self.timeout_s = timeout_s
        self.tail_chars = tail_chars
        self.num_timeouts = 0
        """Cases scored wrong because math-verify ran past `timeout_s`."""
        self.num_crashes = 0
        """Cases scored wrong because their worker died twice."""
        self._context = multiprocessing.get_context("spawn")  # no fork of a threaded (torch/Ray) parent
        self._workers: list[_Worker] = []

    def check(self, responses: list[str], golds: list[str]) -> list[bool]:
        """True for each response whose last boxed answer equals its gold answer."""
        if len(responses) != len(golds):
            raise ValueError(f"check: {len(responses)} responses but {len(golds)} gold answers")
        verdicts: list[bool | None] = []
        pending: deque[tuple[int, str, str]] = deque()
        for index, (response, gold) in enumerate(zip(responses, golds)):
            pred = extract_boxed(response, self.tail_chars)
            verdict = quick_verdict(pred, gold)
            verdicts.append(verdict)
            if verdict is None:
                pending.append((index, pred, gold))
        if pending:
            self._run_pending(pending, verdicts)
        return [bool(verdict) for verdict in verdicts]

    def close(self) -> None:
        """Stop every worker process."""
        for worker in self._workers:
            worker.conn.close()
            worker.process.join(timeout=1.0)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
        self._workers = []

    def __enter__(self) -> AnswerChecker:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _run_pending(self, pending: deque[tuple[int, str, str]], verdicts: list[bool | None]) -> None:
        """Feed the pending cases to the workers, collecting verdicts, timeouts and crashes."""
        while len(self._workers) < self.num_workers:
            self._workers.append(self._spawn())
        for worker in self._workers:
            self._await_ready(worker)
        cases = {index: (pred, gold) for index, pred, gold in pending}
        attempts = dict.fromkeys(cases, 0)
        while pending or any(worker.index is not None for worker in self._workers):
            for slot, worker in enumerate(self._workers):
                if worker.index is None and pending:
                    index, pred, gold = pending.popleft()
                    attempts[index] += 1
                    self._assign(slot, index, pred, gold)
            busy = [worker for worker in self._workers if worker.index is not None]
            if not busy:
                continue
            deadline = min(worker.started for worker in busy) + self.timeout_s
            ready = wait([worker.conn for worker in busy], timeout=max(0.0, deadline - time.monotonic()))
            for slot, worker in enumerate(self._workers):
                if worker.index is None:
                    continue
                if worker.conn in ready:
                    self._collect(slot, worker, verdicts, pending, cases, attempts)
                elif time.monotonic() - worker.started >= self.timeout_s:
                    verdicts[worker.index] = False
                    self.num_timeouts += 1
                    self._replace(slot)

    def _assign(self, slot: int, index: int, pred: str, gold: str) -> None:
        """Hand a case to the worker in `slot`, replacing it first if it has died while idle."""
        worker = self._workers[slot]
        try:
            worker.conn.send((index, pred, gold))
        except (BrokenPipeError, OSError):
            worker = self._replace(slot)
            worker.conn.send((index, pred, gold))
        worker.index, worker.started = index, time.monotonic()

    def _collect(self, slot, worker, verdicts, pending, cases, attempts) -> None:
        """Read a finished verdict; a dead worker gets replaced and its case retried or scored wrong."""
        index = worker.index
        try:
            reply_index, verdict = worker.conn.recv()
        except (EOFError, OSError):
            self._replace(slot)
            if attempts[index] < _MAX_ATTEMPTS:
                pending.appendleft((index, *cases[index]))
            else:
                verdicts[index] = False
                self.num_crashes += 1
            return
        assert reply_index == index, f"worker answered case {reply_index} while working on {index}"
        verdicts[index] = verdict
        worker.index = None

    def _spawn(self) -> _Worker:
        parent_conn, child_conn = self._context.Pipe()
        process = self._context.Process(target=_worker_main, args=(child_conn, os.getpid()), daemon=True)
        process.start()
        child_conn.close()
        return _Worker(process=process, conn=parent_conn)

    def _replace(self, slot: int) -> _Worker:
        """Kill the worker in `slot` (whatever it is doing) and put a fresh one in its place."""
        old = self._workers[slot]
        old.process.kill()
        old.process.join()
        old.conn.close()
        self._workers[slot] = self._await_ready(self._spawn())
        return self._workers[slot]

    @staticmethod
    def _await_ready(worker: _Worker) -> _Worker:
        """Block until a new worker has imported math-verify, so start-up never eats into a case's time."""
        if worker.ready:
            return worker
        try:
            started = worker.conn.poll(_STARTUP_TIMEOUT_S) and worker.conn.recv() == _READY
        except (EOFError, OSError):
            started = False
        if not started:
            worker.process.join(timeout=1.0)
            raise RuntimeError(
                f"answer-check worker pid {worker.process.pid} did not start (exit code {worker.process.exitcode}); "
                "workers use the 'spawn' start method, so the main script must be an importable file whose entry "
                "point is guarded by `if __name__ == '__main__'`"
            )
        worker.ready = True
        return worker
