"""Pre-emption flag on real signals sent to a child process, and when `requeue_if_needed` calls scontrol."""

import signal
import subprocess
import sys
import textwrap

import pytest

from fapo_megatron.cluster.preemption import EXIT_PREEMPTED, requeue_if_needed

CHILD = textwrap.dedent(
    """
    import sys, time
    from fapo_megatron.cluster.preemption import EXIT_PREEMPTED, install_preemption_handler
    flag = install_preemption_handler()
    print("ready", flush=True)
    steps = 0
    while not flag.requested:  # a training loop checks the flag after each step
        time.sleep(0.01)
        steps += 1
    print(f"stopping on {flag.signal_name} after {steps} steps", flush=True)
    sys.exit(EXIT_PREEMPTED)
    """
)


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM, signal.SIGHUP])
def test_signal_sets_the_flag_and_the_loop_exits_with_the_preempted_code(sig):
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    child.send_signal(sig)
    out, err = child.communicate(timeout=30)
    assert child.returncode == EXIT_PREEMPTED == 75
    assert f"stopping on {sig.name}" in out  # the process finished its step and chose to stop: not killed
    assert "will checkpoint after this step" in err


def test_without_the_handler_the_same_signal_kills_the_process():
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout.readline().strip() == "ready"
    child.send_signal(signal.SIGUSR1)
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGUSR1


def test_requeue_is_skipped_outside_slurm_and_when_the_launcher_owns_it():
    assert requeue_if_needed(env={}) is False
    assert requeue_if_needed(env={"SLURM_JOB_ID": "7", "FAPO_REQUEUE": "launcher"}) is False
    assert requeue_if_needed(env={"SLURM_JOB_ID": "7", "FAPO_REQUEUE": "off"}) is False
    with pytest.raises(ValueError, match="FAPO_REQUEUE='sometimes'"):
        requeue_if_needed(env={"SLURM_JOB_ID": "7", "FAPO_REQUEUE": "sometimes"})
