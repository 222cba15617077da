"""Worker groups on a real local Ray: gloo all_reduce through the given env, streamed results, failures named,
pool errors."""

import contextlib
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
import ray
import torch
import torch.distributed as dist

from fapo_megatron.cluster.bundles import PoolTimeoutError, create_pool
from fapo_megatron.cluster.placement import PoolSpec
from fapo_megatron.cluster.pools import ray_session
from fapo_megatron.cluster.workers import WorkerError, WorkerGroup
from fapo_megatron.config import load_config
from fapo_megatron.dist_env import init_distributed_from_env

REPO = Path(__file__).resolve().parents[2]
# Workers import this module by value: tests/ is not importable from Ray's worker processes.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Summer:
    """Joins torch.distributed from the env the group set, then sums over ranks."""

    def __init__(self, scale: float):
        self.scale = scale
        self.dist_env = init_distributed_from_env()

    def all_reduce(self, value: float) -> float:
        tensor = torch.tensor([value * self.scale * (dist.get_rank() + 1)])
        dist.all_reduce(tensor)
        return float(tensor.item())

    def env(self) -> dict:
        keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "FAPO_TEST_MARK")
        return {key: os.environ.get(key) for key in keys} | {"pid": os.getpid(), "backend": dist.get_backend()}

    def shard(self, items: list) -> int:
        return sum(items) * 10 + dist.get_rank()

    def fail_on(self, rank: int) -> int:
        if dist.get_rank() == rank:
            raise ValueError(f"bad shard {rank}")
        return dist.get_rank()


def _wait_for(gate: Path, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not gate.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{gate.name} never opened: the caller did not get the item before it")
        time.sleep(0.01)


class Producer:
    """Yields items that the caller must have received before the next one is made (gates are files it opens)."""

    def __init__(self):
        self.rank = int(os.environ["RANK"])

    def produce(self, num: int, gates: str):
        if self.rank == 0:
            _wait_for(Path(gates) / "rank1-done")  # rank 0 starts only once the caller has all of rank 1's items
        for i in range(num):
            yield (self.rank, i)
            if i + 1 < num:
                _wait_for(Path(gates) / f"{self.rank}-{i}")

    def produce_then_fail(self):
        yield (self.rank, 0)
        if self.rank == 1:
            raise ValueError("engine lost mid-rollout")


class Crasher:
    def die(self):
        os._exit(3)


class ManagerOwner:
    """Starts a multiprocessing Manager server, as megatron-core's checkpoint writer does for its results queue."""

    def start_manager(self) -> int:
        import multiprocessing

        self.queue = multiprocessing.get_context("spawn").Manager().Queue()
        (server,) = [p for p in psutil.Process().children() if "spawn_main" in " ".join(p.cmdline())]
        return server.pid

    def die(self):
        os.kill(os.getpid(), 9)


class BrokenInit:
    def __init__(self, path: str):
        raise FileNotFoundError(f"no checkpoint at {path}")


@pytest.fixture(scope="module")
def session():
    os.environ["RAY_AUTH_MODE"] = "disabled"  # local test cluster only
    cfg = load_config(None, ["cluster.devices_per_node=2"])
    with ray_session(cfg, pool_timeout_s=60) as ray_run:
        yield ray_run


@pytest.fixture(scope="module")
def summers(session):
    return session.worker_group("actor", Summer, init_args=(0.5,), env={"FAPO_TEST_MARK": "seen"})


def test_session_reserves_the_layouts_pool(session):
    pool = session.pools["actor"]
    assert pool.num_bundles == 2 and pool.device == "cpu" and sorted(pool.bundle_order) == [0, 1]
    assert len({node for node, _ in pool.bundle_nodes}) == 1 and all(gpu is None for _, gpu in pool.bundle_nodes)


def test_two_workers_all_reduce_over_gloo_with_the_given_env(summers):
    # rank r contributes 4 * 0.5 * (r + 1): 2 + 4 = 6 on both ranks.
    assert summers.call("all_reduce", 4.0) == [6.0, 6.0]
    envs = summers.call("env")
    assert [(e["RANK"], e["WORLD_SIZE"], e["LOCAL_RANK"]) for e in envs] == [("0", "2", "0"), ("1", "2", "1")]
    assert {(e["MASTER_ADDR"], e["MASTER_PORT"]) for e in envs} == {(summers.master_addr, str(summers.master_port))}
    assert all(e["FAPO_TEST_MARK"] == "seen" and e["backend"] == "gloo" for e in envs)
    pids = [e["pid"] for e in envs]
    assert len(set(pids)) == 2 and pids == summers.pids and os.getpid() not in pids
    assert ray.get(summers.call_async("all_reduce", 1.0)) == [1.5, 1.5]
    assert summers.call_each("shard", [([1, 2],), ([3],)]) == [30, 31]
    assert summers.call_rank(1, "shard", [5]) == 51


def test_a_raising_worker_is_named_by_role_and_rank(summers):
    with pytest.raises(WorkerError) as caught:
        summers.call("fail_on", 1)
    err = caught.value
    assert (err.role, err.rank, err.method) == ("actor", 1, "fail_on")
    assert str(err) == "actor worker rank 1 failed in fail_on(): ValueError: bad shard 1"
    assert err.remote_traceback.startswith("ray::_WorkerHost.call()") and ", in fail_on\n" in err.remote_traceback
    assert summers.call("fail_on", 5) == [0, 1]  # the group survives a raised exception


def test_stream_hands_over_each_item_while_the_workers_still_produce(session, tmp_path):
    """Each rank makes its next item only after the caller got the previous one, and rank 0 starts only after the
    caller got all of rank 1's: a stream that waited for a rank to finish, or read ranks in rank order, would
    leave a worker waiting on its gate (a TimeoutError named by rank) instead of giving this order."""
    producers = WorkerGroup("rollout", Producer, session.pools["actor"], 2, share=0.25)
    try:
        seen = []
        for rank, i in producers.stream("produce", 3, str(tmp_path)):
            seen.append((rank, i))
            (tmp_path / f"{rank}-{i}").touch()
            if (rank, i) == (1, 2):
                (tmp_path / "rank1-done").touch()
        assert seen == [(1, 0), (1, 1), (1, 2), (0, 0), (0, 1), (0, 2)]  # every item once, each rank in its order

        received = []
        with pytest.raises(WorkerError) as caught:
            for item in producers.stream("produce_then_fail"):
                received.append(item)
        err = caught.value
        assert (err.role, err.rank, err.method) == ("rollout", 1, "produce_then_fail")
        assert str(err).endswith("ValueError: engine lost mid-rollout")
        assert (1, 0) in received  # what the failing rank made before it raised was handed over
    finally:
        producers.shutdown()


def test_a_dying_worker_is_named_and_its_group_shuts_down(session):
    crashers = WorkerGroup("rollout", Crasher, session.pools["actor"], 1, share=0.25)
    (pid,) = crashers.pids
    with pytest.raises(WorkerError, match=r"^rollout worker rank 0 failed in die\(\): worker process died"):
        crashers.call("die")
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    crashers.shutdown()
    with pytest.raises(RuntimeError, match="'rollout' was shut down"):
        crashers.call("die")


def test_children_of_a_killed_worker_do_not_outlive_it(session):
    """SIGKILL gives a worker no chance to stop its children; the raylet, made their subreaper, kills them."""
    owners = WorkerGroup("actor", ManagerOwner, session.pools["actor"], 1, share=0.25)
    (manager_pid,) = owners.call("start_manager")
    with pytest.raises(WorkerError, match="worker process died"):
        owners.call("die")
    owners.shutdown()
    try:
        psutil.Process(manager_pid).wait(timeout=30)
    except psutil.NoSuchProcess:
        pass
    except psutil.TimeoutExpired:
        pytest.fail(f"the killed worker's child {manager_pid} is still running")


def test_a_worker_failing_in_init_is_named(session):
    expected = "genrm worker rank 0 failed in BrokenInit.__init__(): FileNotFoundError: no checkpoint at /nope"
    with pytest.raises(WorkerError) as caught:
        WorkerGroup("genrm", BrokenInit, session.pools["actor"], 1, init_args=("/nope",), share=0.25)
    assert str(caught.value) == expected


def test_an_unplaceable_pool_says_what_was_asked_and_what_exists(session):
    spec = PoolSpec(
        name="huge", num_bundles=64, bundle={"CPU": 1.0}, bundles_per_node=64, strategy="STRICT_PACK", roles=("x",)
    )
    total_cpus = ray.cluster_resources()["CPU"]
    with pytest.raises(PoolTimeoutError) as caught:
        create_pool(spec, timeout_s=1.0)
    message = str(caught.value)
    assert "pool 'huge'" in message and "64 bundles of {'CPU': 1.0}" in message and "{'CPU': 64.0}" in message
    assert f"the cluster has {{'CPU': {total_cpus}}}" in message


DRIVER_MARK = "FAPO_TEST_DRIVER_MARK"


def _alive(processes) -> list[psutil.Process]:
    found = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except psutil.Error:
            continue
    return found


def _marked(mark: str) -> list[psutil.Process]:
    """Processes whose environment carries the test's mark (readable unless a process rewrote its title)."""
    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if process.environ().get(DRIVER_MARK) == mark:
                found.append(process)
    return _alive(found)


def test_no_process_outlives_a_sigkilled_driver():
    """The driver (local Ray, two workers each with a Manager child) gets SIGKILL: no clean-up runs, yet within
    seconds nothing it started is left (Ray's own fate-sharing leaves its dashboard and runtime-env agents)."""
    mark = uuid.uuid4().hex
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONPATH=str(REPO), **{DRIVER_MARK: mark})
    driver = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("driver_to_kill.py")), "300"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = []
        for line in driver.stdout:
            lines.append(line)
            if line.strip() == "READY":
                break
        assert lines and lines[-1].strip() == "READY", "".join(lines[-40:])
        temp_dir = Path(lines[-2].split()[-1])
        assert lines[-2].startswith("TEMP ") and temp_dir.is_dir()
        started = psutil.Process(driver.pid).children(recursive=True)
        names = " ".join(f"{process.name()} {' '.join(process.cmdline())}" for process in started)
        assert len(started) >= 8 and "raylet" in names and "DashboardAgent" in names, names
        assert sum("spawn_main" in " ".join(process.cmdline()) for process in started) >= 2, names  # the Managers
    finally:
        driver.kill()
        driver.wait()
    deadline = time.monotonic() + 20.0
    while (left := _alive(started) + _marked(mark)) and time.monotonic() < deadline:
        time.sleep(0.5)
    described = sorted({f"{process.pid} {' '.join(process.cmdline())[:120]}" for process in left})
    for process in left:
        with contextlib.suppress(psutil.Error):
            process.kill()
    assert not left, f"still running 20 s after the driver's SIGKILL: {described}"
    assert not temp_dir.exists(), f"{temp_dir}: the killed driver's Ray folder is left behind"
