"""Processes that die with the process that started them, SIGKILL included.

A SIGKILLed process runs no clean-up, and its children are re-parented and live on: megatron-core's checkpoint
writer's Manager server (and its resource tracker), math-verify workers busy in sympy, and, when a driver that
started a local Ray dies, Ray's dashboard and runtime-env agents (they notice the raylet is gone but do not exit).
Two tools, both reading only the kernel's process table:

* `exit_with_parent(pid)`, called in a child: a daemon thread ends the child once its parent is gone. It polls
  getppid() rather than using PR_SET_PDEATHSIG, which fires when the *thread* that started the child ends.
* `RunReaper`, started by a driver: a small watcher outside the driver's process group records the driver's
  descendants while it lives and, once it has died, kills those still running and everything below them. Orphans
  lose their place in the tree, so the watcher also kills what carries the driver's mark in its environment (set by
  the reaper, inherited by every process started after it; /proc/<pid>/environ is lost where a process rewrites its
  title, as Ray's do, which is why the tree comes first). The driver stops the watcher after its clean teardown.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid

import psutil

MARK_VARIABLE = "FAPO_RUN_MARK"
"""Environment variable carrying a driver's mark; every process it (transitively) starts inherits it."""

_POLL_S = 0.25
_KILL_ROUNDS = 20


def exit_with_parent(parent_pid: int, poll_s: float = 0.5) -> None:
    """End this process (exit status 1) as soon as `parent_pid` is no longer its parent (it died, any way)."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def marked_processes(mark: str, variable: str = MARK_VARIABLE) -> list[int]:
    """Pids of live processes whose environment holds `variable=mark` (this process excluded)."""
    entry = f"{variable}={mark}".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as environ:
                if entry in environ.read().split(b"\0"):
                    found.append(int(name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


class RunReaper:
    """Marks this process's environment and watches it from outside: if this process dies without `close()`, every
    process carrying the mark is killed. Start it before the processes it should cover (e.g. before `ray.init`)."""

    def __init__(self, remove_after: str | None = None) -> None:
        """remove_after: a folder the watcher deletes once it has killed the processes (e.g. Ray's temp dir)."""
        self.mark = f"{os.getpid()}-{uuid.uuid4().hex}"
        self._previous = os.environ.get(MARK_VARIABLE)
        os.environ[MARK_VARIABLE] = self.mark
        # A session of its own: a Ctrl-C or a kill of the driver's process group leaves the watcher to do its job.
        self._watcher = subprocess.Popen(
            [sys.executable, "-m", "fapo_megatron.lifetime", str(os.getpid()), self.mark, remove_after or ""],
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def close(self) -> None:
        """The driver tore down cleanly: stop watching and unmark the environment (idempotent)."""
        if self._watcher.poll() is None:
            self._watcher.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._watcher.wait(timeout=5.0)
        if os.environ.get(MARK_VARIABLE) == self.mark:
            if self._previous is None:
                del os.environ[MARK_VARIABLE]
            else:
                os.environ[MARK_VARIABLE] = self._previous


def _watch(driver_pid: int, mark: str, remove_after: str) -> None:
    """The watcher: record the driver's descendants while it lives; once it is gone, SIGKILL every recorded process
    still running, their descendants and the marked processes, until none is left."""
    try:
        driver = psutil.Process(driver_pid)
    except psutil.Error:
        return
    known: dict[int, psutil.Process] = {}
    while os.getppid() == driver_pid:
        with contextlib.suppress(psutil.Error):
            for process in driver.children(recursive=True):
                known.setdefault(process.pid, process)  # a Process keeps its start time: pid reuse is told apart
        time.sleep(_POLL_S)
    for _ in range(_KILL_ROUNDS):  # rounds: a process may start another while the first are being killed
        victims: dict[int, psutil.Process] = {}
        for process in known.values():
            with contextlib.suppress(psutil.Error):
                if process.is_running():
                    victims[process.pid] = process
                    victims.update((child.pid, child) for child in process.children(recursive=True))
        for pid in marked_processes(mark):
            with contextlib.suppress(psutil.Error):
                victims.setdefault(pid, psutil.Process(pid))
        victims.pop(os.getpid(), None)
        alive = [p for p in victims.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive:
            break
        for process in alive:
            with contextlib.suppress(psutil.Error):
                process.kill()
        time.sleep(_POLL_S)

    if remove_after:
        shutil.rmtree(remove_after, ignore_errors=True)


if __name__ == "__main__":
    _watch(int(sys.argv[1]), sys.argv[2], sys.argv[3])
