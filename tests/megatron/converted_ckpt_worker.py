"""One rank of the converted-checkpoint test job (launched by test_megatron_converted_ckpt.py).

usage: python converted_ckpt_worker.py SCENARIO WORKDIR
  convert  (1 process): HF folders under WORKDIR -> `convert hf-to-megatron` outputs (weights-only checkpoints)
  load     (2 processes, TP2): an actor starts from the converted checkpoint alone, computes log-probs, trains a
           step and saves a training checkpoint; then two loads that must fail naming the mismatched tensor.
Rank 0's results go to WORKDIR/out/<name>.pt.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import torch
from megatron_testlib import make_batch  # the script's folder is on sys.path

WORKDIR = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(".")
RANK = int(os.environ.get("RANK", "0"))

VOCAB = 150
"""Pads to 256 rows with the default unit 128 and to 192 with 64, so a padding mismatch can be made."""


def emit(name: str, value) -> None:
    if RANK == 0:
        (WORKDIR / "out").mkdir(exist_ok=True)
        torch.save(value, WORKDIR / "out" / f"{name}.pt")


def convert() -> None:
    from fapo_megatron.convert import pipeline

    pipeline.hf_to_megatron(WORKDIR / "hf", WORKDIR / "converted", tp=2, progress=False)
    pipeline.hf_to_megatron(WORKDIR / "hf_wide", WORKDIR / "converted_wide", tp=2, thresholds=None, progress=False)
    pipeline.hf_to_megatron(
        WORKDIR / "hf", WORKDIR / "converted_pad64", tp=2, divisible_by=64, thresholds=None, progress=False
    )


def build(**overrides):
    from fapo_megatron.config import load_config
    from fapo_megatron.megatron.actor import MegatronActor

    settings = {
        "model.dtype": "float32",
        "parallel.tp": 2,
        "cluster.devices_per_node": 2,
        "rollout.n": 4,
        "data.batch_size": 2,
        "algorithm.mini_batch_size": 2,
        "optim.lr": 0.001,
        "optim.warmup_steps": 0,
        "trainer.steps": 4,
        **overrides,
    }
    return MegatronActor(load_config(None, [f"{k}={v}" for k, v in settings.items()]))


def _failed_load(actor, folder: Path) -> str:
    from fapo_megatron.megatron.checkpoint import CheckpointMismatchError

    try:
        actor.load(folder)
    except CheckpointMismatchError as err:
        return str(err)
    return "loaded without error"


def load() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    batch = make_batch(vocab=VOCAB)
    actor = build(**{"model.megatron_checkpoint": WORKDIR / "converted"})  # no model.path: weights come from it
    fresh_state = sum(len(opt.optimizer.state) for opt in getattr(actor.optimizer, "chained_optimizers", []))
    emit(
        "fresh",
        {
            "optimizer_steps": actor.optimizer_steps,
            "optimizer_states": fresh_state,
            "lr": actor.optimizer.param_groups[0]["lr"],
        },
    )
    emit("logprobs", actor.compute_logprobs(batch)[0])
    actor.train_step(batch)
    actor.save(WORKDIR / "train_ckpt", 1, {"data_position": 3})
    emit("trained", {name: t.clone() for bucket in actor.export_hf_weights() for name, t in bucket})
    actor.close()

    actor = build(**{"model.path": WORKDIR / "hf"})
    emit("mismatch_shape", _failed_load(actor, WORKDIR / "converted_wide"))
    emit("mismatch_vocab", _failed_load(actor, WORKDIR / "converted_pad64"))
    actor.close()


if __name__ == "__main__":
    {"convert": convert, "load": load}[sys.argv[1]]()
