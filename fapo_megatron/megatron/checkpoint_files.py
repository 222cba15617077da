"""The files of a checkpoint root, without megatron-core: which step folders are complete, which one to resume
from, which ones pruning may delete, and per-file checksums.

The folders are the record; `latest` is only a hint. A step folder is complete when it is named `step_<N>` (no
`.tmp`) and holds meta.json: checkpoint.py writes into `step_<N>.tmp` and renames it when every rank is done, so a
folder with that name was written to the end. Steps are ordered by N, never by folder name. `checksums.json`
(CRC-32 and size of every other file, written last before the rename) lets a load or an export name a file whose
bytes changed since.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import zlib
from pathlib import Path

logger = logging.getLogger(__name__)

LATEST = "latest"
META = "meta.json"
CHECKSUMS = "checksums.json"
_STEP_NAME = re.compile(r"step_(\d+)")
_CHUNK = 16 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint (HF or megatron) that cannot be used as it is; the message names the folder or file."""


def complete_steps(root: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete step folder under `root`, oldest step first."""
    found = []
    for folder in Path(root).glob("step_*"):
        match = _STEP_NAME.fullmatch(folder.name)
        if match and folder.is_dir() and (folder / META).is_file():
            found.append((int(match.group(1)), folder))
    return sorted(found)


def pointer_target(root: str | Path) -> Path | None:
    """The folder `latest` names, or None when the pointer is missing, empty or names no complete folder."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    target = Path(root) / name
    if not name or not (target / META).is_file():
        return None
    return target


def newest_complete(root: str | Path) -> Path | None:
    """The newest complete step folder under `root`; a stale, empty or dangling `latest` is reported and ignored."""
    steps = complete_steps(root)
    newest = steps[-1][1] if steps else None
    hinted = pointer_target(root)
    if hinted != newest and (Path(root) / LATEST).exists():
        logger.warning(
            "%s: '%s' names %s, the newest complete step folder is %s; using the newest",
            root,
            LATEST,
            hinted.name if hinted else "no complete checkpoint",
            newest.name if newest else "none",
        )
    return newest


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder (it holds meta.json), or a root whose newest complete step folder is taken."""
    path = Path(path)
    if (path / META).is_file():
        return path
    newest = newest_complete(path)
    if newest is None:
        raise CheckpointError(f"{path}: not a checkpoint (no {META}) and no complete step_<N> folder under it")
    return newest


def prune(root: str | Path, keep: int) -> list[Path]:
    """Delete the oldest complete step folders beyond `keep`; never the newest one nor the one `latest` names.
    Returns the folders deleted."""
    steps = [folder for _, folder in complete_steps(root)]
    protected = {steps[-1]} if steps else set()
    hinted = pointer_target(root)
    if hinted is not None:
        protected.add(hinted)
    removable = [folder for folder in steps if folder not in protected]
    excess = len(steps) - keep
    doomed = removable[: max(excess, 0)]
    for folder in doomed:
        shutil.rmtree(folder, ignore_errors=True)
    return doomed


def _crc32(path: Path) -> str:
    crc = 0
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _data_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS)


def write_checksums(folder: str | Path) -> None:
    """Record CRC-32 and size of every file under `folder` in folder/checksums.json."""
    folder = Path(folder)
    sums = {str(p.relative_to(folder)): {"crc32": _crc32(p), "bytes": p.stat().st_size} for p in _data_files(folder)}
    (folder / CHECKSUMS).write_text(json.dumps(sums, indent=1, sort_keys=True) + "\n")


def verify_checksums(folder: str | Path) -> None:
    """Raise CheckpointError naming the first file that is missing or whose bytes differ from checksums.json."""
    folder = Path(folder)
    manifest = folder / CHECKSUMS
    if not manifest.is_file():
        logger.warning("%s: no %s, file contents not verified", folder, CHECKSUMS)
        return
    try:
        sums = json.loads(manifest.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{manifest}: unreadable ({err})") from None
    for name, want in sorted(sums.items()):
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (listed in {manifest})")
        size = path.stat().st_size
        if size != want["bytes"]:
            raise CheckpointError(f"{path}: {size} bytes, {want['bytes']} when saved: the file is damaged")
        if _crc32(path) != want["crc32"]:
            raise CheckpointError(f"{path}: checksum differs from the one recorded at save: the file is damaged")


def torch_save(obj, path: str | Path) -> None:
    """torch.save, with a full disk reported as "No space left on device" (torch itself says "unexpected pos")."""
    import torch

    try:
        torch.save(obj, path)
    except RuntimeError as err:
        if _out_of_space(Path(path)):
            raise OSError(errno.ENOSPC, f"No space left on device writing {path}") from err
        raise


def _out_of_space(path: Path) -> bool:
    """Write 64 KiB to `path` (being written anyway) and sync: does the file system refuse for lack of space?"""
    try:
        with path.open("wb") as handle:
            handle.write(bytes(64 * 1024))
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as err:
        return err.errno == errno.ENOSPC
    return False
