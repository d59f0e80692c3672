"""A worker's local checkpoint: its stage's weights, optimizer state, epoch and counters.

One file per identity (``<dir>/<run>/<stage>/<peer id>.pt``), so a worker restarted with the same
key resumes its own state. Writes are atomic (temporary file, then rename) and keep the previous
good checkpoint beside the new one (``.prev``); a checkpoint that cannot be read falls back to that
previous one. A failed write or read never deletes or overwrites a good file.

Disk budget: a new checkpoint is written beside the two kept ones, read back (verified), and only then
moved into place, pushing the oldest out; a checkpoint the worker started from (the coordinator's
download) is removed once its own first one is in place. So one identity never holds more than
``FILES_AT_ONCE`` checkpoint-sized files, which is what the preflight asks of the disk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

NOT_A_STAGE_CHECKPOINT = "the file holds something other than an Agora stage checkpoint"

FILES_AT_ONCE = 3
"""Checkpoint-sized files one worker identity has on disk at most: the previous and the newest
checkpoint and the one being written (before its first own checkpoint, the downloaded one instead of
the previous)."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message says which file, why and what to do."""


@dataclasses.dataclass(frozen=True)
class LoadedCheckpoint:
    state: dict[str, Any]
    path: Path
    """The file the state came from: the checkpoint itself or, if that was unreadable, its ``.prev``."""
    unreadable: tuple[str, ...] = ()
    """``"<file>: <why>"`` for each newer file that was skipped."""


def checkpoint_path(directory: str | Path, run: str, stage: str, peer_id: str) -> Path:
    return Path(directory) / run / stage / f"{peer_id}.pt"


def previous_path(path: Path) -> Path:
    return path.with_suffix(".prev")


def save_checkpoint(path: Path, state: dict[str, Any], *, rotate: bool = True, superseded: tuple[Path, ...] = ()) -> None:
    """Write ``state`` to ``path``, moving the file there to ``.prev`` first. ``rotate=False`` replaces
    ``path`` without that move: for when ``path`` is a file that could not be read, which must not push
    the good ``.prev`` out. ``superseded``: files to remove once the new checkpoint is in place (the
    checkpoint this worker started from); a failed write keeps them."""
    tmp = path.with_suffix(".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # into a Python file object, not a path: torch's own file writer turns ENOSPC into a bare
        # "iostream error", and the errno is what tells the participant the disk is full
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        _verify(tmp)
        if rotate and path.exists():
            os.replace(path, previous_path(path))
        os.replace(tmp, path)
        _sync_directory(path.parent)
    except (OSError, RuntimeError, ValueError) as e:  # torch.save reports some I/O failures as RuntimeError
        if tmp.is_file() or tmp.is_symlink():
            with contextlib.suppress(OSError):
                tmp.unlink()  # a partial file only takes the space a retry needs
        raise CheckpointError(_write_failure(path, e, rotate)) from None
    for old in superseded:
        with contextlib.suppress(OSError):
            old.unlink(missing_ok=True)


def _verify(written: Path) -> None:
    """Read the file just written back (its structure, with the tensors mapped, not loaded): only a
    checkpoint that reads may push an older one out."""
    state = torch.load(written, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(state, dict) or "model" not in state or "epoch" not in state:
        raise ValueError(f"{written} does not read back as a stage checkpoint")


def _sync_directory(directory: Path) -> None:
    # the renames are only durable once the directory is; a crash before that could bring back the old names
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_failure(path: Path, e: BaseException, rotate: bool) -> str:
    good = (path, previous_path(path)) if rotate else (previous_path(path),)  # without rotate, path is the unreadable one
    kept = next((p for p in good if p.exists()), None)
    outcome = f"the previous one is kept: {kept}" if kept else "there is no earlier checkpoint yet"
    os_error = _find_os_error(e)
    code = os_error.errno if os_error else None
    if code in (errno.ENOSPC, errno.EDQUOT):
        full = "the disk is full" if code == errno.ENOSPC else "the disk quota is used up"
        return (f"could not write checkpoint {path}: {full}{_free_space(path.parent)}. Free space there or set "
                f"server.checkpoint_dir in the run config to a disk with room; {outcome}")
    if code == errno.EFBIG:
        return (f"could not write checkpoint {path}: the file would be larger than this process may write "
                f"(the shell's `ulimit -f`, or the file system's largest file). Raise that limit or set "
                f"server.checkpoint_dir in the run config to another file system; {outcome}")
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f"could not write checkpoint {path}: {os_error.strerror}. Make {path.parent} writable for this "
                f"user or set server.checkpoint_dir in the run config to a directory that is; {outcome}")
    reason = os_error.strerror if os_error and os_error.strerror else _first_line(e)
    return f"could not write checkpoint {path}: {reason}; {outcome}"


def _find_os_error(e: BaseException | None) -> OSError | None:
    # torch wraps a failed write of the file object in a RuntimeError; the OSError rides along as its context
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno is not None:
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _free_space(directory: Path) -> str:
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return ""
    amount = f"{free / 2**30:.1f} GiB" if free >= 2**30 else f"{free / 2**20:.0f} MiB"
    return f" ({amount} free in {directory})"


def _first_line(e: BaseException) -> str:
    # torch's messages can run to a page (weights_only explains itself at length)
    text = str(e).strip().splitlines()
    line = text[0] if text else type(e).__name__
    return line if len(line) <= 200 else line[:200] + "…"


def read_checkpoint(path: Path, *, mmap: bool = False) -> LoadedCheckpoint | None:
    """The newest readable checkpoint at ``path`` or its previous copy; None if neither exists.
    CheckpointError if files exist and none can be read: they are left as they are. ``mmap`` maps the
    tensors instead of reading them: a reader that needs only the weights never loads the optimizer
    state (two thirds of a production checkpoint) into memory."""
    unreadable = []
    for candidate in (path, previous_path(path)):
        if not candidate.exists():
            continue
        try:
            state = torch.load(candidate, map_location="cpu", weights_only=True, mmap=mmap)
            if not isinstance(state, dict) or "model" not in state or "epoch" not in state:
                raise ValueError(NOT_A_STAGE_CHECKPOINT)
        except Exception as e:
            why = _read_failure(candidate, e)
            unreadable.append(f"{candidate}: {why}")
            logger.warning("checkpoint %s is unreadable (%s); trying an older one", candidate, _first_line(e))
            continue
        return LoadedCheckpoint(state, candidate, tuple(unreadable))
    if unreadable:
        raise CheckpointError(
            "No checkpoint of this worker can be read (" + "; ".join(unreadable) + "). They were left as they are. "
            "Delete these files to start this worker afresh, or put back a good copy."
        )
    return None


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The state of ``read_checkpoint``: the newest readable checkpoint, None if there is none."""
    loaded = read_checkpoint(path)
    return loaded.state if loaded else None


def _read_failure(path: Path, e: Exception) -> str:
    # torch's own words (a page on weights_only, "internal miniz error") only help a developer: the log file has them
    if isinstance(e, OSError):
        return e.strerror or str(e)
    if isinstance(e, ValueError) and str(e) == NOT_A_STAGE_CHECKPOINT:
        return NOT_A_STAGE_CHECKPOINT
    try:
        if path.stat().st_size == 0:
            return "the file is empty"
    except OSError:
        pass
    return "the file is damaged or incomplete"
