"""`wait_for_ray` against a real Ray head started the way tools/slurm/ray_node.sh starts one."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from slurm_localhost import free_port_range

from fapo_megatron.cluster.slurm import wait_for_ray

RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture
def ray_head(monkeypatch):
    port = free_port_range(1)
    temp = tempfile.mkdtemp(prefix="fray", dir="/tmp")
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    head = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--block",
            "--port",
            str(port),
            "--num-cpus",
            "2",
            "--num-gpus",
            "0",
            "--include-dashboard=false",
            "--disable-usage-stats",
            "--temp-dir",
            temp,
            "--resources",
            '{"fapo_node:node1": 1}',
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # local test cluster only (PLATFORM.md)
    yield f"127.0.0.1:{port}"
    head.send_signal(signal.SIGTERM)  # `ray start --block` stops its Ray processes on SIGTERM
    head.wait(timeout=60)
    shutil.rmtree(temp, ignore_errors=True)


def test_joined_node_passes_and_a_missing_one_is_named(ray_head):
    deadline = time.monotonic() + 60
    while True:
        try:
            assert wait_for_ray(ray_head, ["node1"], "CPU", 2, timeout_s=30, poll_s=0.5) == {"node1": 2.0}
            break
        except ConnectionError:
            assert time.monotonic() < deadline
            time.sleep(1)
    with pytest.raises(TimeoutError) as err:
        wait_for_ray(ray_head, ["node1", "node2"], "CPU", 2, timeout_s=2, poll_s=0.5)
    assert f"Ray at {ray_head}: after 2 s, 1 of 2 nodes have not joined with their CPUs: node2 (0 of 2 CPU)" in str(
        err.value
    )
    with pytest.raises(TimeoutError, match=r"node1 \(0 of 8 GPU\)"):
        wait_for_ray(ray_head, ["node1"], "GPU", 8, timeout_s=1, poll_s=0.5)
