"""What a training run needs before its first step: tokenizer and data, the judge, and where to resume from."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from fapo_megatron.config import Config, ConfigError, DataConfig, TrainerConfig, to_dict
from fapo_megatron.data.arith import make_arith_items
from fapo_megatron.data.items import PromptItem
from fapo_megatron.data.loaders import load_prompts
from fapo_megatron.data.templates import load_tokenizer
from fapo_megatron.genrm.task import load_genrm_items
from fapo_megatron.genrm.types import Judge
from fapo_megatron.megatron import checkpoint_files
from fapo_megatron.metrics import METRICS_FILE, TENSORBOARD_DIR


@dataclass
class RunData:
    tokenizer: object
    train: list[PromptItem]
    val: list[PromptItem]
    monitor_judge: Judge | None
    """A free judge (the arithmetic task's program checker) that reports flaws on validation; None otherwise."""


def load_train_val(cfg: DataConfig, *, genrm_max_steps: int = 32) -> tuple[list[PromptItem], list[PromptItem]]:
    """(train, val) prompts: generated arithmetic chains, or the jsonl files (no val_path: no validation).

    `genrm_max_steps` (genrm.max_steps) is the step split of GenRM training prompts (data.format=genrm_steps).
    """
    if cfg.format == "arith":
        steps = {
            "min_steps": cfg.arith_min_steps,
            "max_steps": cfg.arith_max_steps,
            "max_value": cfg.arith_max_value,
            "max_operand": cfg.arith_max_operand,
            "identity_steps": cfg.arith_identity_steps,
        }
        train = make_arith_items(cfg.arith_num_train, cfg.seed, split="train", **steps)
        val = make_arith_items(cfg.arith_num_val, cfg.seed, split="val", **steps) if cfg.arith_num_val else []
        return train, val
    if cfg.format == "genrm_steps":
        train = load_genrm_items(cfg.train_path, genrm_max_steps)
        val = load_genrm_items(cfg.val_path, genrm_max_steps) if cfg.val_path else []
        return train, val
    train = load_prompts(cfg.train_path, cfg.format)
    val = load_prompts(cfg.val_path, cfg.format) if cfg.val_path else []
    return train, val


def load_run_data(cfg: Config) -> RunData:
    train, val = load_train_val(cfg.data, genrm_max_steps=cfg.genrm.max_steps)
    if len(train) < cfg.data.batch_size:
        raise ValueError(f"data: {len(train)} training prompts, fewer than data.batch_size={cfg.data.batch_size}")
    monitor = None
    if cfg.data.format == "arith":
        from fapo_megatron.genrm.program_judge import ProgramJudge

        monitor = ProgramJudge(max_steps=cfg.genrm.max_steps)
    return RunData(tokenizer=load_tokenizer(cfg), train=train, val=val, monitor_judge=monitor)


def build_judge_for_run(cfg: Config, session, genrm_worker_cls: type) -> Judge | None:
    """The flaw detector of this run: in-process (program checker, external URL) or GenRM workers on devices
    (a group of `genrm_worker_cls`, the trainer's roles.genrm.GenRMWorker, on the session's GenRM bundles).

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
    from fapo_megatron.cluster.role_groups import GenRMGroup  # Ray is imported only for runs that place workers

    group = session.worker_group("genrm", genrm_worker_cls, init_args=(to_dict(cfg),), engine_role="genrm")
    return GenRMGroup(group, cfg.genrm)


def resume_path(trainer: TrainerConfig, output_dir: Path, *, same_run: bool = False) -> Path | None:
    """The checkpoint this run continues from, or None for a fresh start.

    auto: the newest complete step folder under output_dir/checkpoints (`latest` is only a hint); none: fresh; else
    that checkpoint path. A fresh start into an output_dir that holds an earlier run's metrics or checkpoints is
    refused, since it would overwrite them, unless trainer.overwrite is set: then they are deleted first.
    `same_run` (the output_dir's config.yaml is this run's config): with auto, this run restarting before its first
    complete checkpoint (a requeue or kill between the step's metrics row and its save) starts over without asking.
    """
    checkpoint_dir = output_dir / "checkpoints"
    if trainer.resume not in ("auto", "none"):
        return checkpoint_files.resolve_checkpoint(trainer.resume)
    if trainer.resume == "auto":
        newest = checkpoint_files.newest_complete(checkpoint_dir)
        if newest is not None:
            return newest
    earlier = [p for p in (output_dir / METRICS_FILE, checkpoint_dir) if _holds_data(p)]
    restarting = same_run and trainer.resume == "auto"
    if earlier and not (trainer.overwrite or restarting):
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
