"""Pre-emption contract between a SLURM job and the trainer.

The sbatch script asks Slurm for SIGUSR1 some minutes before the time limit (`--signal=B:USR1@secs`) and
forwards it to the trainer. The trainer calls `install_preemption_handler()` once, checks `flag.requested`
after every step, and when it is set saves a checkpoint and exits with `EXIT_PREEMPTED`. The launcher
(tools/slurm/fapo.sbatch) then calls `requeue_if_needed()`, and the requeued job resumes from the checkpoint
with `trainer.resume=auto`. SIGTERM (what Slurm sends at the limit or on `scancel`) sets the same flag, so a
step that finishes inside Slurm's KillWait still gets its checkpoint.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass

EXIT_PREEMPTED = 75
"""Exit code of a trainer that stopped early on a pre-emption request (EX_TEMPFAIL: "try again later")."""

PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


@dataclass
class PreemptionFlag:
    """Set from a signal handler; read by the training loop between steps."""

    requested: bool = False
    """True once a pre-emption signal arrived."""
    signal_name: str = ""
    """Name of the first signal that arrived (SIGUSR1 or SIGTERM), for the log line."""


def install_preemption_handler(signals: tuple[signal.Signals, ...] = PREEMPTION_SIGNALS) -> PreemptionFlag:
    """Route `signals` to a flag instead of the default action (which kills the process mid-step).

    Must be called from the main thread (a Python rule for signal handlers). A second signal only logs.
    """
    flag = PreemptionFlag()

    def handle(signum, _frame):
        name = signal.Signals(signum).name
        if not flag.requested:
            flag.requested = True
            flag.signal_name = name
        print(f"fapo-megatron: {name} received; will checkpoint after this step and exit {EXIT_PREEMPTED}",
              file=sys.stderr, flush=True)

    for sig in signals:
        signal.signal(sig, handle)
    return flag


def requeue_if_needed(env: dict[str, str] | None = None, scontrol: str = "scontrol") -> bool:
    """Requeue this Slurm job (`scontrol requeue $SLURM_JOB_ID`); False when not under Slurm or not wanted.

    FAPO_SLURM_REQUEUE=0 (set by the sbatch script when the job was submitted without requeue) turns it off.
    A failed `scontrol` raises, naming the job and Slurm's message: a silent failure would end the run.
    """
    env = os.environ if env is None else env
    job_id = env.get("SLURM_JOB_ID", "")  # an array element has its own SLURM_JOB_ID, so this covers arrays too
    if not job_id or env.get("FAPO_SLURM_REQUEUE", "1") == "0":
        return False
    proc = subprocess.run([scontrol, "requeue", job_id], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"scontrol requeue {job_id} failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return True


def main(argv: list[str] | None = None) -> int:
    """`python -m fapo_megatron.cluster.preemption requeue`: the sbatch script's requeue step."""
    argv = sys.argv[1:] if argv is None else argv
    if argv != ["requeue"]:
        print("usage: python -m fapo_megatron.cluster.preemption requeue", file=sys.stderr)
        return 2
    requeued = requeue_if_needed()
    print("fapo-megatron: job requeued" if requeued else "fapo-megatron: not requeued (no Slurm job or disabled)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
