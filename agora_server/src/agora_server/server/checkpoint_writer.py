"""A worker's periodic checkpoints, written on a thread of their own so training does not wait on the disk.

The compute thread only takes a snapshot (``detached_copy``: the state's tensors copied to the host,
seconds even at production size, where ``torch.save`` and the fsync take minutes for ~23 GB); this
thread serialises and writes it (``OwnCheckpoint.save``: temporary file, read back, atomic rename).

One write at a time. A checkpoint that falls due while the previous one is still being written is
skipped, with a ``CheckpointSkipped`` event, rather than queued: a queued one would hold a second
copy of the stage's state in memory for as long as the disk lags, and the disk, already behind, would
only fall further behind; the next one falls due ``checkpoint_every`` steps later anyway. The check
comes before the snapshot, so a skipped checkpoint costs the compute thread nothing.

The writing thread is not a daemon: a process that exits while it writes waits for the file to be
complete (a crash, which nothing can wait for, leaves the previous checkpoint in place).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

from agora_server.server.resume import OwnCheckpoint
from agora_server.telemetry.events import CheckpointSkipped, Event


def detached_copy(state: Any) -> Any:
    """``state`` with every tensor copied to the host and its containers rebuilt: a snapshot that
    training, stepping the live tensors on, cannot change."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {key: detached_copy(value) for key, value in state.items()}
    if isinstance(state, list):
        return [detached_copy(value) for value in state]
    if isinstance(state, tuple):
        return tuple(detached_copy(value) for value in state)
    return state  # numbers and strings: nothing to copy


class CheckpointWriter:
    def __init__(self, checkpoint: OwnCheckpoint, stage: str, emit: Callable[[Event], None]):
        self._checkpoint, self._stage, self._emit = checkpoint, stage, emit
        self._idle = threading.Event()
        self._idle.set()

    @property
    def writing(self) -> bool:
        return not self._idle.is_set()

    def start(self, take_state: Callable[[], dict[str, Any]], *, epoch: int, next_try: int,
              then: Callable[[], None] | None = None) -> bool:
        """Snapshot ``take_state()`` here (on the compute thread) and write it in the background; ``then``
        runs on the writing thread once the file is in place. False, and a ``CheckpointSkipped`` event,
        when the previous write is still going. Only one thread may call this (the compute thread)."""
        if self.writing:
            self._emit(CheckpointSkipped(stage=self._stage, epoch=epoch, next_try=next_try))
            return False
        state = detached_copy(take_state())
        self._idle.clear()
        threading.Thread(target=self._write, args=(state, next_try, then), name=f"checkpoint-{self._stage}").start()
        return True

    def wait(self, timeout: float | None = None) -> bool:
        """Until no write is in progress; False if ``timeout`` passed first."""
        return self._idle.wait(timeout)

    def _write(self, state: dict[str, Any], next_try: int, then: Callable[[], None] | None) -> None:
        try:
            if self._checkpoint.save(state, next_try) and then is not None:
                then()
        finally:
            self._idle.set()
