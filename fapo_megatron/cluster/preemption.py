"""Pre-emption contract between a SLURM job and the trainer.

The sbatch script asks Slurm for SIGUSR1 some minutes before the time limit (`--signal=B:USR1@secs`) and
forwards it to the trainer. The trainer calls `install_preemption_handler()` once, checks `flag.requested`
after every step, and when it is set saves a checkpoint, calls `requeue_if_needed()` and exits with
`EXIT_PREEMPTED`. Under tools/slurm/fapo.sbatch.in the script itself requeues (FAPO_REQUEUE=launcher), once
Ray is down; the requeued job resumes from the checkpoint with `trainer.resume=auto`. SIGTERM (what Slurm
sends at the limit or on `scancel`) and SIGHUP set the same flag, so a step that finishes inside KillWait still
saves.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass

EXIT_PREEMPTED = 75
"""Exit code of a trainer that stopped early on a pre-emption request (EX_TEMPFAIL: "try again later")."""

PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGHUP)
"""SIGHUP (the terminal or ssh session went away) is handled like SIGTERM: checkpoint, tear down, exit."""
REQUEUE_MODES = ("self", "launcher", "off")


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
        print(
            f"fapo-megatron: {name} received; will checkpoint after this step and exit {EXIT_PREEMPTED}",
            file=sys.stderr,
            flush=True,
        )

    for sig in signals:
        signal.signal(sig, handle)
    return flag


def requeue_if_needed(env: dict[str, str] | None = None, scontrol: str = "scontrol") -> bool:
    """Requeue this Slurm job (`scontrol requeue $SLURM_JOB_ID`) after a pre-emption checkpoint.

    Returns False, doing nothing, when not under Slurm or when FAPO_REQUEUE says someone else decides:
    `launcher` (tools/slurm/fapo.sbatch requeues after tearing Ray down, outside any container) or `off`
    (submitted without requeue). Unset or `self`: this process requeues. So a trainer can always call it.
    A failed `scontrol` raises, naming the job and Slurm's message: a silent failure would end the run.
    """
    env = os.environ if env is None else env
    job_id = env.get("SLURM_JOB_ID", "")  # an array element has its own SLURM_JOB_ID, so arrays are covered
    mode = env.get("FAPO_REQUEUE", "self")
    if mode not in REQUEUE_MODES:
        raise ValueError(f"FAPO_REQUEUE={mode!r}: expected one of {REQUEUE_MODES}")
    if not job_id or mode != "self":
        return False
    proc = subprocess.run([scontrol, "requeue", job_id], capture_output=True, text=True, env=dict(env))
    if proc.returncode != 0:
        raise RuntimeError(f"scontrol requeue {job_id} failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return True
