import contextlib
import os
import threading
import time
import uuid
from multiprocessing import resource_tracker

import psutil
import pytest

# Tests run on CPU, offline, and must not pick up a user's Ray cluster or hub settings.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("RAY_ADDRESS", None)

SESSION_MARK = "FAPO_TEST_SESSION"
# Each pytest process (every xdist worker imports this anew) marks what it starts; inherited by all descendants.
os.environ[SESSION_MARK] = f"{os.getpid()}-{uuid.uuid4().hex}"
_GRACE_S = 30.0


def _running(process: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    return False


class _Descendants(threading.Thread):
    """Records this process's descendants every second: an orphan (its parent killed) leaves the tree, and one that
    rewrote its title (Ray's) has lost the environment that would name it."""

    def __init__(self):
        super().__init__(name="test-session-descendants", daemon=True)
        self.seen: dict[int, psutil.Process] = {}
        self.stop = threading.Event()

    def run(self):
        me = psutil.Process()
        while not self.stop.wait(1.0):
            with contextlib.suppress(psutil.Error):
                for process in me.children(recursive=True):
                    self.seen.setdefault(process.pid, process)


def _session_processes(descendants: _Descendants) -> list[psutil.Process]:
    """Live processes this test session started: descendants now, recorded ones, and those carrying its mark."""
    found = {p.pid: p for p in psutil.Process().children(recursive=True)}
    found.update(descendants.seen)
    mark = os.environ[SESSION_MARK]
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if process.pid not in found and process.environ().get(SESSION_MARK) == mark:
                found[process.pid] = process
    # multiprocessing's resource tracker of this process stays until it exits, then ends by itself (pipe closed).
    found.pop(getattr(resource_tracker._resource_tracker, "_pid", None), None)
    return [process for process in found.values() if _running(process)]


@pytest.fixture(scope="session", autouse=True)
def no_process_outlives_the_session():
    """`make test` must leave no process behind: once every test and fixture is done, whatever the session started
    gets `_GRACE_S` to exit; survivors fail the session (and are killed)."""
    descendants = _Descendants()
    descendants.start()
    yield
    descendants.stop.set()
    deadline = time.monotonic() + _GRACE_S
    while (left := _session_processes(descendants)) and time.monotonic() < deadline:
        time.sleep(0.5)
    described = [f"{p.pid} {' '.join(p.cmdline())[:150]}" for p in left if _running(p)]
    for process in left:
        with contextlib.suppress(psutil.Error):
            process.kill()
    if described:
        pytest.fail(f"{len(described)} processes started by the tests outlived them: {described}", pytrace=False)
