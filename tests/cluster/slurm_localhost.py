"""A real Slurm (munge + slurmctld + two slurmd nodes) on this machine, for tests/cluster/test_slurm_real.py.

Both emulated nodes (node1, node2) are localhost with 2 CPUs each (docs: PLATFORM.md). Everything lives in a
short temp folder (Unix socket paths are limited to 107 bytes) with ports of its own; `stop()` cancels every
job first, because stopping the daemons does not stop running jobs.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "sinfo", "munged", "mungekey"]
NODES = ["node1", "node2"]


def ensure_installed() -> str:
    """Install Slurm and munge with apt-get when missing; '' on success, else why not (the skip reason)."""
    if all(shutil.which(name) for name in BINARIES):
        return ""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "slurm/munge missing and cannot apt-get install them (needs root and apt-get)"
    install = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    proc = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        subprocess.run(["apt-get", "update"], capture_output=True, env=env, timeout=900)
        proc = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0 or not all(shutil.which(name) for name in BINARIES):
        return f"apt-get install {' '.join(PACKAGES)} failed: {proc.stderr.strip()[-400:]}"
    return ""


def free_port_range(count: int) -> int:
    """First of `count` consecutive free TCP ports."""
    for _ in range(50):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            base = sock.getsockname()[1]
        if base + count < 65000 and all(_port_free(base + i) for i in range(count)):
            return base
    raise RuntimeError("no free port range found")


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass
class LocalSlurm:
    root: Path
    conf: Path = field(init=False)
    env: dict[str, str] = field(init=False)

    def __post_init__(self):
        self.conf = self.root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(args), capture_output=True, text=True, env=self.env, timeout=120)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def start(self) -> None:
        munge_dir = self.root / "munge"
        munge_dir.mkdir(mode=0o755)
        key = munge_dir / "munge.key"
        subprocess.run(["mungekey", "-c", "-k", str(key)], check=True, capture_output=True)
        key.chmod(0o400)
        socket_path = munge_dir / "munge.socket"
        subprocess.run(
            [
                "munged",
                "--force",
                f"--socket={socket_path}",
                f"--key-file={key}",
                f"--pid-file={munge_dir}/munged.pid",
                f"--log-file={munge_dir}/munged.log",
                f"--seed-file={munge_dir}/munged.seed",
            ],
            check=True,
            capture_output=True,
        )
        ctld_port = free_port_range(1)
        node_port = free_port_range(len(NODES))
        for node in NODES:
            (self.root / "spool" / node).mkdir(parents=True)
        (self.root / "state").mkdir()
        self.conf.write_text(_slurm_conf(self.root, socket_path, ctld_port, node_port))
        self.run("slurmctld", "-f", str(self.conf))
        for node in NODES:
            self.run("slurmd", "-f", str(self.conf), "-N", node)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            states = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split()
            if states.count("idle") == len(NODES):
                return
            time.sleep(0.5)
        raise RuntimeError(f"slurm nodes not idle after 60 s: {states}; logs in {self.root}")

    def job_state(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as key -> value (JobState, ExitCode, Restarts, ...)."""
        text = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(item.split("=", 1) for item in text.split() if "=" in item)

    def wait_done(self, job_id: str, timeout_s: float) -> dict[str, str]:
        """Poll until the job has finished for good (not pending, running, or requeued)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                return state
            time.sleep(1)
        raise TimeoutError(f"job {job_id} not done after {timeout_s} s: {self.job_state(job_id)}")

    def stop(self) -> None:
        jobs = self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
        if jobs:
            self.run("scancel", *jobs, check=False)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.run("squeue", "-h", check=False).stdout.strip():
                time.sleep(0.5)
        pid_files = [self.root / f"slurmd-{node}.pid" for node in NODES]
        pid_files += [self.root / "slurmctld.pid", self.root / "munge" / "munged.pid"]
        pids = []
        for pid_file in pid_files:
            if pid_file.is_file():
                try:
                    pids.append(int(pid_file.read_text().strip()))
                    os.kill(pids[-1], signal.SIGTERM)
                except (ProcessLookupError, ValueError):
                    pass
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
            time.sleep(0.2)
        shutil.rmtree(self.root, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _slurm_conf(root: Path, munge_socket: Path, ctld_port: int, node_port: int) -> str:
    host = socket.gethostname()
    return f"""\
ClusterName=fapotest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
SchedulerParameters=sched_interval=2,bf_interval=1
ReturnToService=2
MinJobAge=600
KillWait=10
InactiveLimit=0
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
NodeName=node[1-2] NodeHostname=localhost NodeAddr=127.0.0.1 CPUs=2 RealMemory=8000 Port=[{node_port}-{node_port + 1}]
PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP
"""


def start_local_slurm() -> LocalSlurm:
    """A running two-node Slurm in a fresh short temp folder."""
    cluster = LocalSlurm(Path(tempfile.mkdtemp(prefix="fslurm", dir="/tmp")))
    try:
        cluster.start()
    except Exception:
        cluster.stop()
        raise
    return cluster
