"""What a training run needs before its first step: tokenizer and data, the judge, and where to resume from."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fapo_megatron.config import Config, ConfigError, TrainerConfig, to_dict
from fapo_megatron.data import PromptItem
from fapo_megatron.data.from_config import load_train_val
from fapo_megatron.genrm.types import Judge, JudgeRequest, Verdict
from fapo_megatron.megatron import checkpoint_files
from fapo_megatron.metrics import METRICS_FILE, TENSORBOARD_DIR
from fapo_megatron.roles.policy import load_tokenizer, prompt_shard


@dataclass
class RunData:
    tokenizer: object
    train: list[PromptItem]
    val: list[PromptItem]
    monitor_judge: Judge | None
    """A free judge (the arithmetic task's program checker) that reports flaws on validation; None otherwise."""


def load_run_data(cfg: Config) -> RunData:
    train, val = load_train_val(cfg.data, genrm_max_steps=cfg.genrm.max_steps)
    if len(train) < cfg.data.batch_size:
        raise ValueError(f"data: {len(train)} training prompts, fewer than data.batch_size={cfg.data.batch_size}")
    monitor = None
    if cfg.data.format == "arith":
        from fapo_megatron.genrm.program_judge import ProgramJudge

        monitor = ProgramJudge(max_steps=cfg.genrm.max_steps)
    return RunData(tokenizer=load_tokenizer(cfg), train=train, val=val, monitor_judge=monitor)


class WorkerJudge:
    """Splits a step's GenRM requests over the GenRM worker group (one engine per worker), in order."""

    def __init__(self, group):
        self.group = group

    def judge(self, requests: Sequence[JudgeRequest]) -> list[Verdict]:
        num = self.group.num_workers
        shards = [list(requests[i] for i in prompt_shard(len(requests), r, num)) for r in range(num)]
        self.group.call("resume_engine")
        try:
            answers = self.group.call_each("judge", [(shard,) for shard in shards])
        finally:
            self.group.call("release_engine")
        return [verdict for shard in answers for verdict in shard]


def build_judge_for_run(cfg: Config, session) -> Judge | None:
    """The flaw detector of this run: in-process (program checker, external URL) or GenRM workers on devices.

    GRPO runs get no judge, except the free program checker, whose verdicts are logged but not rewarded.
    """
    from fapo_megatron.genrm.build import build_judge

    if cfg.algorithm.reward == "genrm_step":
        return None  # GenRM training: the policy is the GenRM, scored against labels
    backend = cfg.genrm.backend
    if backend in ("program", "external"):
        if cfg.algorithm.name == "grpo" and backend != "program":
            return None
        return build_judge(cfg.genrm)
    if cfg.algorithm.name == "grpo":
        return None
    from fapo_megatron.roles.genrm import GenRMWorker

    num = session.layout.num_workers("genrm") // cfg.genrm.tp
    group = session.worker_group("genrm", GenRMWorker, init_args=(to_dict(cfg),), num_workers=num)
    group.call("release_engine")
    return WorkerJudge(group)


def resume_path(trainer: TrainerConfig, output_dir: Path) -> Path | None:
    """The checkpoint this run continues from, or None for a fresh start.

    auto: the newest complete step folder under output_dir/checkpoints (`latest` is only a hint); none: fresh; else
    that checkpoint path. A fresh start into an output_dir that holds an earlier run's metrics or checkpoints is
    refused, since it would overwrite them, unless trainer.overwrite is set: then they are deleted first.
    """
    checkpoint_dir = output_dir / "checkpoints"
    if trainer.resume not in ("auto", "none"):
        return checkpoint_files.resolve_checkpoint(trainer.resume)
    if trainer.resume == "auto":
        newest = checkpoint_files.newest_complete(checkpoint_dir)
        if newest is not None:
            return newest
    earlier = [p for p in (output_dir / METRICS_FILE, checkpoint_dir) if _holds_data(p)]
    if earlier and not trainer.overwrite:
        why = "has no complete checkpoint to resume" if trainer.resume == "auto" else "is trainer.resume=none"
        raise ConfigError(
            f"trainer.output_dir={output_dir} already holds {' and '.join(p.name for p in earlier)} of an earlier "
            f"run, and this start {why}: it would overwrite them. Pick another trainer.output_dir, resume a "
            "checkpoint (trainer.resume=PATH), or set trainer.overwrite=true to delete them and start over"
        )
    for path in earlier + [output_dir / TENSORBOARD_DIR]:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    return None


def _holds_data(path: Path) -> bool:
    if path.is_dir():
        return any(path.iterdir())
    return path.is_file() and path.stat().st_size > 0
