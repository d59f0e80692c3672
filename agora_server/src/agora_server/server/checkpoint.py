"""A worker's local checkpoint: its stage's weights, optimizer state, epoch and counters.

One file per identity (``<dir>/<run>/<stage>/<peer id>.pt``), so a worker restarted with the same
key resumes its own state. Writes are atomic (temporary file, then rename) and keep the previous
good checkpoint beside the new one; a checkpoint that cannot be read falls back to that previous one.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message says which file and why."""


def checkpoint_path(directory: str | Path, run: str, stage: str, peer_id: str) -> Path:
    return Path(directory) / run / stage / f"{peer_id}.pt"


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if path.exists():
            os.replace(path, path.with_suffix(".prev"))
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports some I/O failures as RuntimeError
        if tmp.is_file():
            tmp.unlink()
        raise CheckpointError(f"could not write checkpoint {path}: {getattr(e, 'strerror', None) or e}; the previous one is kept") from None


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The newest readable checkpoint at ``path`` (or its previous copy); None if there is none."""
    problems = []
    for candidate in (path, path.with_suffix(".prev")):
        if not candidate.exists():
            continue
        try:
            state = torch.load(candidate, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or "model" not in state or "epoch" not in state:
                raise ValueError("not an Agora stage checkpoint")
        except Exception as e:
            problems.append(f"{candidate}: {type(e).__name__}: {e}")
            logger.warning("checkpoint %s is unreadable (%s); trying an older one", candidate, e)
            continue
        return state
    if problems:
        raise CheckpointError("no readable checkpoint: " + "; ".join(problems) + ". Delete these files to start fresh.")
    return None
