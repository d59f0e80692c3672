"""Which state a worker starts from, and the checkpoints it will start from next time.

Its own checkpoint comes first (the newest readable file, else the previous one); without one, the
stage's state from elsewhere (the coordinator's checkpoint); without either, the run seed's weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agora_server.server.checkpoint import CheckpointError, LoadedCheckpoint, read_checkpoint, save_checkpoint
from agora_server.telemetry.events import CheckpointFailed, Event

SHARED_KEYS = ("model", "optimizer", "epoch")
"""What a worker takes from a state it did not save itself: the stage's, never another identity's counters."""


class OwnCheckpoint:
    """This identity's checkpoint file of its stage."""

    def __init__(self, path: Path, initial_state: Path | None, stage: str, emit: Callable[[Event], None]):
        """``initial_state``: the stage's state from elsewhere, used when ``path`` holds no checkpoint.
        CheckpointError if files exist at ``path`` and none can be read."""
        self.path, self._stage, self._emit = path, stage, emit
        own = read_checkpoint(path)
        shared = read_checkpoint(initial_state) if own is None and initial_state is not None else None
        # a newest file that could not be read is overwritten by the next save instead of being moved
        # over the good .prev it was resumed from
        self._rotate = not (own and own.unreadable)
        # the download is only needed until this worker has a checkpoint of its own (the disk budget)
        self._superseded = (initial_state,) if shared is not None else ()
        if shared is not None:
            shared = dataclasses.replace(shared, state={key: shared.state[key] for key in SHARED_KEYS})
        self.start: LoadedCheckpoint | None = own or shared
        """The state to start from; None: the run seed's weights."""

    @property
    def start_epoch(self) -> int:
        return self.start.state["epoch"] if self.start else 0

    @property
    def online_seconds_before(self) -> float:
        """Time this identity served before this start (none counted in a state from elsewhere)."""
        return float(self.start.state.get("online_seconds", 0.0)) if self.start else 0.0

    def save(self, state: dict[str, Any], next_try: int | None = None) -> bool:
        """Write ``state``. A failure keeps the last good file and is reported, never raised: a full
        disk must not stop a worker that can still train and serve. ``next_try``: the step the
        caller tries again at, for the report."""
        try:
            save_checkpoint(self.path, state, rotate=self._rotate, superseded=self._superseded)
        except CheckpointError as e:
            later = f"; training goes on and the next checkpoint is tried at step {next_try}" if next_try else ""
            self._emit(CheckpointFailed(stage=self._stage, reason=f"{e}{later}"))
            return False
        self._rotate, self._superseded = True, ()
        return True
