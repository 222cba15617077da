"""AnswerChecker: process-pool grading with per-case timeouts and recovery from dead workers."""

import multiprocessing
import os
import signal
import time

import pytest

from fapo_megatron.verify import AnswerChecker

# math-verify expands this polynomial for minutes: a case that must hit the time limit.
SLOW_RESPONSE = r"\boxed{(a+b+c+d+e+f)^{30}}"
SLOW_GOLD = "a^{30}"


def _worker_pids(checker):
    return [worker.process.pid for worker in checker._workers]


def test_timeout_counts_as_wrong_and_pool_keeps_working():
    with AnswerChecker(num_workers=2, timeout_s=1.0) as checker:
        assert checker.check([r"\boxed{0.5}"], [r"\frac{1}{2}"]) == [True]  # workers started
        start = time.monotonic()
        verdicts = checker.check(
            [SLOW_RESPONSE, r"\boxed{\frac{1}{2}}", r"\boxed{2\sqrt{2}}", r"\boxed{3}"],
            [SLOW_GOLD, "0.5", r"\sqrt{8}", "4"],
        )
        assert verdicts == [False, True, True, False]
        assert checker.num_timeouts == 1
        assert time.monotonic() - start < 30.0  # 1 s limit + a replacement start-up (the slow case takes minutes)
        assert checker.check([r"\boxed{\pi/2}"], [r"\frac{\pi}{2}"]) == [True]
        assert checker.num_timeouts == 1


def test_survives_killed_workers():
    with AnswerChecker(num_workers=2, timeout_s=10.0) as checker:
        assert checker.check([r"\boxed{0.5}"], [r"\frac{1}{2}"]) == [True]
        old_pids = _worker_pids(checker)
        for pid in old_pids:
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
        verdicts = checker.check([r"\boxed{0.25}", r"\boxed{\sqrt{4}}", r"\boxed{(1,2]}"], [r"\frac14", "2", "[1,2)"])
        assert verdicts == [True, True, False]
        assert set(_worker_pids(checker)).isdisjoint(old_pids)
        assert checker.num_crashes == 0


def test_close_stops_workers_and_checks_inputs():
    checker = AnswerChecker(num_workers=1, timeout_s=5.0)
    assert checker.check([r"\boxed{\frac{2}{3}}"], ["4/6"]) == [True]
    processes = [worker.process for worker in checker._workers]
    checker.close()
    assert all(not process.is_alive() for process in processes)
    assert not [child for child in multiprocessing.active_children() if child in processes]
    with pytest.raises(ValueError, match="2 responses but 1 gold"):
        checker.check(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="num_workers"):
        AnswerChecker(num_workers=0)


def test_cheap_cases_need_no_workers():
    with AnswerChecker(num_workers=1) as checker:
        assert checker.check([r"\boxed{1,000}", "no box", r"\boxed{7}"], ["1000", "1", "8"]) == [True, False, False]
        assert checker._workers == []


def test_case_whose_worker_dies_twice_is_wrong_and_counted():
    import threading

    killed = []

    def kill_busy_workers():
        deadline = time.monotonic() + 30
        while len(killed) < 2 and time.monotonic() < deadline:
            for worker in list(checker._workers):
                if worker.index is not None and worker.process.pid not in killed:
                    time.sleep(0.2)
                    killed.append(worker.process.pid)
                    os.kill(worker.process.pid, signal.SIGKILL)
            time.sleep(0.05)

    with AnswerChecker(num_workers=1, timeout_s=60.0) as checker:
        assert checker.check([r"\boxed{0.5}"], [r"\frac{1}{2}"]) == [True]
        killer = threading.Thread(target=kill_busy_workers)
        killer.start()
        start = time.monotonic()
        assert checker.check([SLOW_RESPONSE], [SLOW_GOLD]) == [False]
        killer.join()
        assert len(killed) == 2
        assert checker.num_crashes == 1
        assert checker.num_timeouts == 0
        assert time.monotonic() - start < 45  # two replacement start-ups on a loaded machine
        assert checker.check([r"\boxed{\sqrt{9}}"], ["3"]) == [True]


PARENT_SCRIPT = f"""
from fapo_megatron.verify import AnswerChecker
if __name__ == "__main__":
    checker = AnswerChecker(num_workers=1, timeout_s=600.0)
    checker.check([r"\\boxed{{0.5}}"], [r"\\frac{{1}}{{2}}"])
    print(checker._workers[0].process.pid, flush=True)
    checker.check([r"{SLOW_RESPONSE}"], [r"{SLOW_GOLD}"])
"""


def test_a_worker_busy_in_sympy_dies_with_its_sigkilled_parent(tmp_path):
    """SIGKILL of the checker's process closes no pipe a worker stuck in sympy would read: it must notice anyway."""
    import subprocess
    import sys

    import psutil

    script = tmp_path / "parent.py"
    script.write_text(PARENT_SCRIPT)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        worker = psutil.Process(int(parent.stdout.readline()))
        time.sleep(1.0)  # the slow case has reached the worker
        assert worker.is_running()
    finally:
        parent.kill()
        parent.wait()
    try:
        worker.wait(timeout=10)
    except psutil.TimeoutExpired:
        worker.kill()
        pytest.fail(f"answer-check worker {worker.pid} still running 10 s after its parent's SIGKILL")
