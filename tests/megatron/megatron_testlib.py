"""Shared pieces of the multi-process megatron tests: tiny HF models, a fixed batch, rank launching."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from fapo_megatron.algo.batch import TrainBatch
from fapo_megatron.models.spec import tiny_hf_config


def tiny_hf_model(family: str, seed: int, **overrides):
    """A tiny random HF model of `family` with non-trivial norms and biases, so that a misplaced one shows."""
    import transformers

    classes = {"qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}
    cfg = {k: v for k, v in tiny_hf_config(family, **overrides).items() if k not in ("model_type", "architectures")}
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(classes[family](**cfg), attn_implementation="eager")
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.1 * torch.randn_like(param))
    return model.float().eval()


def make_batch(seed: int = 0, vocab: int = 128) -> TrainBatch:
    """2 prompts x 4 rollouts, right-padded to 16 tokens, responses from position 4."""
    gen = torch.Generator().manual_seed(seed)
    rows, seq = 8, 16
    tokens = torch.randint(0, vocab, (rows, seq), generator=gen)
    lengths = torch.tensor([16, 11, 9, 16, 6, 13, 16, 10])
    mask = torch.zeros(rows, seq)
    for row in range(rows):
        mask[row, 4 : lengths[row]] = 1.0
    return TrainBatch(
        tokens=tokens,
        lengths=lengths,
        response_mask=mask,
        advantages=torch.randn(rows, generator=gen),
        group_ids=torch.arange(rows) // 4,
        rollout_logprobs=-torch.rand(rows, seq, generator=gen) * mask,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


LAUNCH_MARK = "FAPO_TEST_LAUNCH"
"""Environment variable naming the launch (workdir/scenario) of every rank process and what they start."""


def launch_mark(workdir: Path, scenario: str) -> str:
    return f"{workdir}/{scenario}"


def launched_processes(workdir: Path, scenario: str) -> list:
    """The live processes (psutil) a launch of `scenario` started: its ranks and their children."""
    import psutil

    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get(LAUNCH_MARK) == launch_mark(workdir, scenario):
                if process.status() != psutil.STATUS_ZOMBIE:
                    found.append(process)
        except psutil.Error:
            continue
    return found


def launch_ranks(worker: Path, scenario: str, world: int, workdir: Path, timeout: float = 240) -> list[int]:
    """Run `worker SCENARIO WORKDIR` as `world` gloo ranks; their exit codes (logs in WORKDIR/SCENARIO_rank*.log).

    A free port can be taken by a parallel test between picking it and binding it: then run again on another one.
    """
    for _ in range(2):
        codes = _launch_once(worker, scenario, world, workdir, timeout)
        if codes == [0] * world or "EADDRINUSE" not in rank_logs(workdir, scenario, world):
            break
    return codes


def _launch_once(worker: Path, scenario: str, world: int, workdir: Path, timeout: float) -> list[int]:
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
            PYTHONWARNINGS="ignore",
            **{LAUNCH_MARK: launch_mark(workdir, scenario)},
        )
        with open(workdir / f"{scenario}_rank{rank}.log", "w") as log:
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(worker), scenario, str(workdir)],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
    try:
        return [proc.wait(timeout=timeout) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()


def rank_logs(workdir: Path, scenario: str, world: int) -> str:
    return "\n".join((workdir / f"{scenario}_rank{r}.log").read_text()[-3000:] for r in range(world))
