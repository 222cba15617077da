"""The run folder as the record of a run: which checkpoint a resume takes (the newest complete step folder, whatever
`latest` says), what pruning may delete, when a fresh start is refused, and how metrics.jsonl is rewound."""

import json
import logging
from pathlib import Path

import pytest

from fapo_megatron.config import ConfigError, TrainerConfig
from fapo_megatron.megatron import checkpoint_files
from fapo_megatron.metrics import MetricsLogger, read_metrics
from fapo_megatron.run_setup import resume_path


def _step(root: Path, step: int, *, name: str | None = None) -> Path:
    """A complete step folder as checkpoint.save_checkpoint leaves it (meta.json last, then the rename)."""
    folder = root / (name or f"step_{step:08d}")
    folder.mkdir(parents=True)
    (folder / "weights.distcp").write_bytes(bytes(range(256)) * 4)
    (folder / "meta.json").write_text(json.dumps({"step": step}))
    checkpoint_files.write_checksums(folder)
    return folder


def _point(root: Path, text: str) -> None:
    (root / "latest").write_text(text)


@pytest.mark.parametrize("pointer", [None, "", "step_00000099", "step_00000002"])
def test_resume_takes_newest_complete_step_whatever_latest_says(tmp_path, pointer, caplog):
    """Missing, empty, dangling or stale `latest`: the newest complete folder (a .tmp one is not complete)."""
    root = tmp_path / "checkpoints"
    _step(root, 2)
    newest = _step(root, 4)
    (root / "step_00000006.tmp").mkdir()
    if pointer is not None:
        _point(root, pointer)
    with caplog.at_level(logging.WARNING):
        assert resume_path(TrainerConfig(output_dir=str(tmp_path)), tmp_path) == newest
        assert checkpoint_files.resolve_checkpoint(root) == newest
    if pointer is not None:
        assert "step_00000004" in caplog.text  # a pointer that disagrees is reported


def test_resolve_names_root_without_complete_step(tmp_path):
    (tmp_path / "step_00000003.tmp").mkdir()
    _point(tmp_path, "step_00000003")
    with pytest.raises(checkpoint_files.CheckpointError, match="no complete step_<N> folder"):
        checkpoint_files.resolve_checkpoint(tmp_path)


def test_prune_keeps_latest_and_newest_and_orders_by_step_number(tmp_path):
    _step(tmp_path, 4)
    older = _step(tmp_path, 2)
    _point(tmp_path, older.name)  # a run restarted at 0 wrote step 2 after step 4
    assert checkpoint_files.prune(tmp_path, keep=1) == []
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000002", "step_00000004"]

    other = tmp_path / "unpadded"
    _step(other, 9, name="step_9")
    ten = _step(other, 10, name="step_10")
    _point(other, ten.name)
    assert [p.name for p in checkpoint_files.prune(other, keep=1)] == ["step_9"]
    assert ten.is_dir()


def test_checksums_name_the_damaged_or_missing_file(tmp_path):
    folder = _step(tmp_path, 1)
    checkpoint_files.verify_checksums(folder)
    data = bytearray((folder / "weights.distcp").read_bytes())
    data[100] ^= 0xFF
    (folder / "weights.distcp").write_bytes(bytes(data))
    with pytest.raises(checkpoint_files.CheckpointError, match=r"weights.distcp: checksum differs"):
        checkpoint_files.verify_checksums(folder)
    (folder / "weights.distcp").unlink()
    with pytest.raises(checkpoint_files.CheckpointError, match=r"weights.distcp: missing"):
        checkpoint_files.verify_checksums(folder)


@pytest.mark.parametrize("resume", ["auto", "none"])
def test_fresh_start_into_earlier_run_is_refused_unless_overwrite(tmp_path, resume):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "step_00000001.tmp").mkdir()
    with pytest.raises(ConfigError, match=r"already holds metrics.jsonl and checkpoints .*trainer.overwrite=true"):
        resume_path(TrainerConfig(output_dir=str(tmp_path), resume=resume), tmp_path)
    assert (tmp_path / "metrics.jsonl").is_file()
    assert resume_path(TrainerConfig(output_dir=str(tmp_path), resume=resume, overwrite=True), tmp_path) is None
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "checkpoints").exists()


def test_same_run_restarting_before_its_first_checkpoint_starts_over(tmp_path):
    """A requeue between step 1's metrics row and its save: the same config, resume=auto, starts over; another
    config, or resume=none, is still refused."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "step_00000001.tmp").mkdir()
    with pytest.raises(ConfigError, match="already holds"):
        resume_path(TrainerConfig(output_dir=str(tmp_path), resume="none"), tmp_path, same_run=True)
    assert resume_path(TrainerConfig(output_dir=str(tmp_path)), tmp_path, same_run=True) is None
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "checkpoints").exists()


def test_resume_rewinds_metrics_keeping_completed_rows_and_a_torn_line(tmp_path, caplog):
    rows = [json.dumps({"step": s, "reward/mean": s / 10}) for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(rows) + '\n{"step": 4, "rew')  # killed mid-write
    with caplog.at_level(logging.WARNING):
        logger = MetricsLogger(tmp_path, resume_step=2)
    assert "metrics.jsonl:4: torn last line" in caplog.text
    logger.log(3, {"reward/mean": 0.5})
    logger.close()
    assert [(r["step"], r["reward/mean"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [
        (1, 0.1),
        (2, 0.2),
        (3, 0.5),
    ]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"ste\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a metrics record"):
        read_metrics(tmp_path / "metrics.jsonl")
