"""The generated sbatch script on a real Slurm: two emulated nodes on this machine (tests/cluster/slurm_localhost.py).

Each test submits through `fapo-megatron slurm submit` and waits for the job, so the script's Ray bootstrap,
preflight, training, signal forwarding and requeue all run for real. CPU mode: one actor process per node.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurm_localhost import ensure_installed, free_port_range, start_local_slurm

REPO = Path(__file__).resolve().parents[2]
VENV = Path(sys.executable).parent.parent


@pytest.fixture(scope="session")
def slurm():
    reason = ensure_installed()
    if reason:
        pytest.skip(reason)
    cluster = start_local_slurm()
    yield cluster
    cluster.stop()


def submit_chain(slurm, tmp: Path, *overrides: str, flags: tuple[str, ...] = ()) -> list[str]:
    """Submit configs/tiny_cpu.yaml on both nodes with `overrides`; returns the job ids."""
    ray_port, preflight_port = free_port_range(1), free_port_range(1)
    command = [
        sys.executable,
        "-m",
        "fapo_megatron",
        "slurm",
        "submit",
        str(REPO / "configs" / "tiny_cpu.yaml"),
        "parallel.tp=1",
        f"trainer.output_dir={tmp / 'run'}",
        f"slurm.tmpdir={tmp / 't'}",
        "slurm.env=[RAY_AUTH_MODE=disabled]",
        "slurm.socket_ifname=lo",  # test traffic stays on 127.0.0.1, Ray included
        f"slurm.ray_port={ray_port}",
        f"slurm.preflight_port={preflight_port}",
        "slurm.min_free_disk_gb=0.1",
        "slurm.ray_join_timeout_s=180",
        "trainer.progress=false",
        *overrides,
        "--nodes",
        "2",
        "--gpus-per-node",
        "1",
        "--venv",
        str(VENV),
        "--log-dir",
        str(tmp / "logs"),
        *flags,
    ]
    proc = subprocess.run(command, capture_output=True, text=True, env=slurm.env, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def submit(slurm, tmp: Path, *overrides: str, flags: tuple[str, ...] = ()) -> str:
    [job] = submit_chain(slurm, tmp, *overrides, flags=flags)
    return job


def job_log(tmp: Path, job_id: str) -> str:
    return (tmp / "logs" / f"fapo-{job_id}.out").read_text()


def metrics_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture
def short_tmp():
    """A short folder (Ray's Unix sockets live under slurm.tmpdir and must stay under 107 bytes)."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="fjob", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_preflight_only_chain_brings_up_ray_on_both_nodes(slurm, short_tmp):
    first, job = submit_chain(slurm, short_tmp, flags=("--preflight-only", "--chain", "2"))
    state = slurm.wait_done(job, 300)
    log = job_log(short_tmp, job)
    assert state["JobState"] == "COMPLETED", log
    first_state = slurm.job_state(first)
    assert first_state["JobState"] == "COMPLETED", job_log(short_tmp, first)
    assert first_state["EndTime"] <= state["StartTime"]  # afterany: the second job waited for the first
    assert "preflight: all checks passed" in log
    assert "all-reduce of 1 MiB over 2 tasks" in log
    assert "node1 2 CPU, node2 2 CPU" in log  # both emulated nodes joined the Ray cluster with their CPUs
    assert "fapo: preflight-only job" in log
    assert "fapo: Ray head at 127.0.0.1:" in log


def test_requeue_if_needed_requeues_a_real_job_and_names_a_missing_one(slurm):
    from fapo_megatron.cluster.preemption import requeue_if_needed

    job = slurm.run("sbatch", "--parsable", "-N1", "--wrap", "sleep 120").stdout.strip()
    deadline = time.monotonic() + 60
    while slurm.job_state(job)["JobState"] != "RUNNING":
        assert time.monotonic() < deadline, slurm.job_state(job)
        time.sleep(0.5)
    assert requeue_if_needed(env=dict(slurm.env, SLURM_JOB_ID=job)) is True
    assert slurm.job_state(job)["Restarts"] == "1"
    slurm.run("scancel", job)
    with pytest.raises(RuntimeError, match="scontrol requeue 999999 failed"):
        requeue_if_needed(env=dict(slurm.env, SLURM_JOB_ID="999999"))


def test_preflight_failure_stops_the_job_and_names_the_node(slurm, short_tmp):
    job = submit(
        slurm, short_tmp, "data.format=gsm8k", "data.train_path=/nonexistent/train.jsonl", flags=("--preflight-only",)
    )
    state = slurm.wait_done(job, 300)
    log = job_log(short_tmp, job)
    assert state["JobState"] == "FAILED", log
    assert "preflight FAILED [node1] paths: data.train_path: /nonexistent/train.jsonl does not exist" in log
    assert "preflight FAILED [node2] paths: data.train_path" in log
    assert "fapo: preflight failed; nothing was trained" in log
    assert "Ray at" not in log  # nothing expensive started


def test_tiny_cpu_run_completes(slurm, short_tmp):
    pytest.importorskip("fapo_megatron.trainer", reason="the trainer has not landed yet")
    job = submit(slurm, short_tmp, "trainer.steps=2", "trainer.val_interval=0")
    state = slurm.wait_done(job, 900)
    log = job_log(short_tmp, job)
    assert state["JobState"] == "COMPLETED", log
    assert "fapo: trainer exited with 0" in log
    assert metrics_steps(short_tmp / "run") == [1, 2]
    assert latest_checkpoint_step(short_tmp / "run") == 2


def latest_checkpoint_step(run_dir: Path) -> int:
    """The training step the trainer stored with its latest checkpoint (the folder is named by optimizer step)."""
    import torch

    latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    return torch.load(latest / "extra.pt", weights_only=False)["step"]


def _wait_for_step(slurm, job: str, run_dir: Path, step: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if len(metrics_steps(run_dir)) >= step:
            return
        assert slurm.job_state(job)["JobState"] in ("PENDING", "RUNNING", "CONFIGURING"), slurm.job_state(job)
        time.sleep(1)
    raise TimeoutError(f"job {job} did not reach step {step} in {timeout_s} s")


def _wait_for_checkpoint(slurm, job: str, run_dir: Path, timeout_s: float) -> None:
    """Until a complete checkpoint exists (a step's metrics row is written before its save)."""
    from fapo_megatron.megatron.checkpoint_files import newest_complete

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if newest_complete(run_dir / "checkpoints") is not None:
            return
        assert slurm.job_state(job)["JobState"] in ("PENDING", "RUNNING", "CONFIGURING"), slurm.job_state(job)
        time.sleep(1)
    raise TimeoutError(f"job {job} wrote no complete checkpoint in {timeout_s} s")


def test_requeued_run_resumes_at_the_latest_checkpoint(slurm, short_tmp):
    pytest.importorskip("fapo_megatron.trainer", reason="the trainer has not landed yet")
    run_dir = short_tmp / "run"
    job = submit(slurm, short_tmp, "trainer.steps=4", "trainer.checkpoint_interval=1", "trainer.val_interval=0")
    _wait_for_checkpoint(slurm, job, run_dir, 600)
    slurm.run("scontrol", "requeue", job)
    state = slurm.wait_done(job, 900)
    log = job_log(short_tmp, job)
    assert state["JobState"] == "COMPLETED", log
    assert state["Restarts"] == "1"
    assert "(restart 1)" in log
    resumed = [int(line.rsplit(" ", 1)[-1]) for line in log.splitlines() if "resumed from" in line]
    assert len(resumed) == 1 and resumed[0] >= 1, log  # the second run started from a checkpoint, not step 0
    assert metrics_steps(run_dir) == [1, 2, 3, 4]  # every step once: steps past the checkpoint were dropped and redone
    assert latest_checkpoint_step(run_dir) == 4


def test_usr1_checkpoints_requeues_and_resumes_at_that_step(slurm, short_tmp):
    pytest.importorskip("fapo_megatron.trainer", reason="the trainer has not landed yet")
    run_dir = short_tmp / "run"
    job = submit(slurm, short_tmp, "trainer.steps=4", "trainer.checkpoint_interval=0", "trainer.val_interval=0")
    _wait_for_step(slurm, job, run_dir, 1, 600)
    slurm.run("scancel", "--batch", "--signal=USR1", job)  # what --signal=B:USR1@secs delivers before the limit
    state = slurm.wait_done(job, 900)
    log = job_log(short_tmp, job)
    assert state["JobState"] == "COMPLETED", log
    assert "fapo: trainer exited with 75" in log and "fapo: requeueing job" in log
    stopped_at = int(log.split("resumed from", 1)[1].splitlines()[0].rsplit(" ", 1)[-1])
    first_run = log.split("(restart 1)", 1)[0]
    assert "fapo: trainer exited with 75" in first_run
    assert 1 <= stopped_at < 4  # the pre-emption checkpoint (interval 0 saves nothing else) is where it resumed
    assert metrics_steps(run_dir) == [1, 2, 3, 4]
