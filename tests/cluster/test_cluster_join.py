"""Joining a running Ray cluster via cluster.ray_address, and SIGTERM teardown of a session that started Ray.

A child process runs a real `ray_session` (local Ray + a worker group) and prints its address; this test
process joins it, runs a group there, leaves, and then SIGTERMs the child: every process the child's Ray
spawned must be gone.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
import ray
import torch
import torch.distributed as dist

from fapo_megatron.cluster.pools import ray_session
from fapo_megatron.config import load_config
from fapo_megatron.dist_env import init_distributed_from_env

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

HEAD_SCRIPT = textwrap.dedent(
    """
    import json, os, time
    import ray
    from fapo_megatron.cluster.pools import ray_session
    from fapo_megatron.config import load_config

    class Idler:
        def pid(self):
            return os.getpid()

    cfg = load_config(None, ["cluster.devices_per_node=2"])
    with ray_session(cfg, num_cpus=4) as session:
        group = session.worker_group("actor", Idler)
        info = {"address": ray.get_runtime_context().gcs_address, "worker_pids": group.call("pid")}
        print(json.dumps(info), flush=True)
        time.sleep(600)
    """
)


class RankSum:
    def __init__(self):
        init_distributed_from_env()

    def sum_ranks(self) -> tuple[int, int]:
        tensor = torch.tensor([dist.get_rank() + 1])
        dist.all_reduce(tensor)
        return int(tensor.item()), os.getpid()


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    env = dict(os.environ, RAY_AUTH_MODE="disabled")  # local test cluster only
    env.pop("RAY_ADDRESS", None)
    script = tmp_path_factory.mktemp("head") / "head.py"
    script.write_text(HEAD_SCRIPT)
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"head process exited with {process.wait(timeout=30)} before reporting its address")
        yield process, json.loads(line)
    finally:
        if process.poll() is None:
            for child in psutil.Process(process.pid).children(recursive=True):
                child.kill()
            process.kill()
            process.wait(timeout=30)


def test_joining_an_existing_cluster_runs_workers_there_and_leaves_it_up(head):
    process, info = head
    os.environ["RAY_AUTH_MODE"] = "disabled"
    cfg = load_config(None, ["cluster.devices_per_node=2", f"cluster.ray_address={info['address']}"])
    with ray_session(cfg, pool_timeout_s=60) as session:
        assert not session.started_local and session.temp_dir is None
        results = session.worker_group("actor", RankSum).call("sum_ranks")
        assert [total for total, _ in results] == [3, 3]
        head_processes = {child.pid for child in psutil.Process(process.pid).children(recursive=True)}
        assert {pid for _, pid in results} <= head_processes  # the workers run under the head's raylet
    assert not ray.is_initialized()
    assert process.poll() is None, "leaving a joined cluster must not stop it"
    for _, pid in results:
        assert _gone_within(pid, timeout_s=15), f"worker {pid} of the joined session outlived it"


def test_sigterm_tears_down_every_process_of_a_started_ray(head):
    process, info = head
    spawned = psutil.Process(process.pid).children(recursive=True)
    names = {child.name() for child in spawned}
    assert {"gcs_server", "raylet"} <= names and set(info["worker_pids"]) <= {child.pid for child in spawned}
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 128 + signal.SIGTERM
    survivors = [child for child in spawned if _alive(child.pid)]
    assert not survivors, f"processes left after SIGTERM: {[(p.pid, p.name()) for p in survivors]}"


def _gone_within(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
