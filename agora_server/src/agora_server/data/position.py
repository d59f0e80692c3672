"""A trainer's place in its data stream, kept across restarts.

A rank's stream of micro-batches is a pure function of the data config, the micro-batch size, the
rank and the world size (``PackedBatches``), so a micro-batch is named by its index in that stream.
The position records which indices are finished (trained, or dropped for a failure); a restarted
trainer takes up the same stream and skips them. Several micro-batches are in flight at once and
finish out of order, so the position is a low-water mark (everything below it is finished) plus the
finished indices above it, at most about ``max_in_flight`` of them. Micro-batches abandoned by a stop
are not finished: they are sent again after the restart.

Beside them it keeps a ``StreamPoint`` at or before the low-water mark: where the stream can be
taken up without tokenizing what comes before it (the documents before it are only counted past),
so a restart late in a run costs about one shuffle block of tokenizing, not the whole run's.

The file is JSON, replaced atomically after every finished micro-batch: a trainer killed at any
moment has saved every micro-batch it reported as completed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .config import DataConfig

_STREAM_FIELDS_IGNORED = {"cache_dir", "retry_first_seconds", "retry_max_seconds", "retry_give_up_seconds"}
"""DataConfig fields that do not change the stream's content or order."""
_STREAM_FORMAT = 2
"""Bumped when the same settings would give another stream (2: sequences shuffled in blocks), so that
positions saved by an earlier version are not applied to it."""


class StreamBatch(NamedTuple):
    index: int
    """Place of the micro-batch in its rank's stream (0 for the first)."""
    tokens: torch.Tensor
    labels: torch.Tensor


def stream_key(config: DataConfig, batch_size: int, rank: int, world_size: int) -> str:
    """Names one numbering of micro-batches: a saved position is only valid for the same key."""
    settings = {k: v for k, v in config.model_dump(mode="json").items() if k not in _STREAM_FIELDS_IGNORED}
    settings |= {"batch_size": batch_size, "rank": rank, "world_size": world_size, "format": _STREAM_FORMAT}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def tokens_digest(tokens: torch.Tensor) -> str:
    """A short fingerprint of a micro-batch's token ids (reported with it, compared across restarts)."""
    return hashlib.sha256(tokens.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True, eq=False)
class StreamPoint:
    """A place in a rank's stream of windows (token sequences) from which packing can start again:
    the start of a shuffle block, given by where its first window is cut from the token stream."""

    window: int
    """Index of this window in the rank's stream (the first of its shuffle block)."""
    epoch: int
    documents: int
    """Documents of the epoch read before the group of documents the window is cut from."""
    carry: np.ndarray
    """Tokens left over from the windows before that group (at most ``seq_len``), which start the next window."""
    windows_into_group: int
    """Windows already cut from the carry and that group before this one."""

    def to_json(self) -> dict:
        return {"window": self.window, "epoch": self.epoch, "documents": self.documents, "carry": self.carry.tolist(),
                "windows_into_group": self.windows_into_group}

    @classmethod
    def from_json(cls, raw: dict) -> StreamPoint:
        """ValueError, KeyError or TypeError if ``raw`` is not a point."""
        numbers = {name: int(raw[name]) for name in ("window", "epoch", "documents", "windows_into_group")}
        if min(numbers.values()) < 0:
            raise ValueError("negative place in the stream")
        return cls(carry=np.asarray([int(token) for token in raw["carry"]], dtype=np.int64), **numbers)


class StreamPoints:
    """The points one stream has passed, for starting it again there. Filled by the thread that reads
    the data, read by the one that saves the position, hence the lock."""

    def __init__(self, keep: int = 64):
        self._points: dict[int, StreamPoint] = {}  # by window, oldest first
        self._keep, self._lock = keep, threading.Lock()

    def add(self, point: StreamPoint) -> None:
        with self._lock:
            self._points.setdefault(point.window, point)
            while len(self._points) > self._keep:  # a stream read without a position (a test, a benchmark)
                del self._points[next(iter(self._points))]

    def before(self, window: int, *, forget_older: bool = False) -> StreamPoint | None:
        """The latest point at or before ``window``; ``forget_older``: let go of the points before it,
        which the stream will not be taken up from again (its position has passed them)."""
        with self._lock:
            found = max((w for w in self._points if w <= window), default=None)
            if found is None:
                return None
            if forget_older:
                for older in [w for w in self._points if w < found]:
                    del self._points[older]
            return self._points[found]


@dataclasses.dataclass
class DataPosition:
    finished_below: int = 0
    """Every micro-batch with a smaller index is finished."""
    finished_above: set[int] = dataclasses.field(default_factory=set)
    """Finished micro-batches at or above ``finished_below`` (out of order while others are in flight)."""
    point: StreamPoint | None = dataclasses.field(default=None, compare=False)
    """Where to take the stream up to reach ``finished_below`` (None: its beginning)."""

    def is_finished(self, index: int) -> bool:
        return index < self.finished_below or index in self.finished_above

    def finish(self, index: int) -> None:
        if self.is_finished(index):
            return
        self.finished_above.add(index)
        while self.finished_below in self.finished_above:
            # the mark moves before the index leaves the set: the data thread asking meanwhile sees it finished
            done = self.finished_below
            self.finished_below += 1
            self.finished_above.discard(done)

    @property
    def finished(self) -> int:
        return self.finished_below + len(self.finished_above)


class PositionFile:
    """The saved position of one stream (``key``) in one file."""

    def __init__(self, path: str | Path, key: str):
        self.path, self.key = Path(path), key

    def load(self) -> tuple[DataPosition, str | None]:
        """The saved position, and why it was not used when a fresh one comes back instead (None when
        there was simply no file yet)."""
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return DataPosition(), None
        except (OSError, ValueError) as e:
            return DataPosition(), f"{self.path} could not be read ({type(e).__name__}); starting from the beginning"
        if not isinstance(raw, dict) or raw.get("stream") != self.key:
            return DataPosition(), (f"{self.path} is the position of another data stream (the data settings, micro-batch size"
                                    " or data shard changed, or an earlier version saved it); starting from the beginning")
        try:
            point = StreamPoint.from_json(raw["point"]) if raw.get("point") is not None else None
            return DataPosition(int(raw["finished_below"]), {int(i) for i in raw["finished_above"]}, point), None
        except (KeyError, TypeError, ValueError):
            return DataPosition(), f"{self.path} is damaged; starting from the beginning"

    def save(self, position: DataPosition) -> None:
        data = {"stream": self.key, "finished_below": position.finished_below, "finished_above": sorted(position.finished_above),
                "point": position.point.to_json() if position.point is not None else None}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(data), encoding="utf-8")
        # rename is atomic: a kill mid-write leaves the previous position, never half a file; no fsync,
        # as the position must survive the process, and a lost machine loses little by replaying a few
        os.replace(tmp, self.path)
