"""A stream of micro-batches that outlives failures of its data source.

Streaming from the Hugging Face Hub meets network errors mid-run. When the stream raises, it is
reported, and after a wait that doubles with every failure in a row it is opened again at the first
micro-batch not handed out yet (the stream is a pure function of its settings, so the numbering is
the same), so nothing is lost or handed out twice. A source that fails without
yielding anything for ``give_up_after`` seconds is given up on: ``DataSourceGaveUp`` is raised.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator

from .position import StreamBatch

OpenStream = Callable[[int, Callable[[int], bool]], Iterator[StreamBatch]]
"""Opens the stream at a micro-batch (``PackedBatches.numbered``); the second argument names the indices to pass over."""


class DataSourceGaveUp(RuntimeError):
    """The data source kept failing for longer than the stream waits; the message says for how long and why."""


@dataclasses.dataclass(frozen=True)
class SourceFailure:
    error: str
    """The error's type and first line, at most 200 characters."""
    failures: int
    """Failures in a row, this one included."""
    retry_in: float
    next_index: int
    """The micro-batch the reopened stream continues with."""


def describe_error(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return text if len(text) <= 200 else text[:199] + "…"


class RetryingStream:
    def __init__(
        self,
        open_stream: OpenStream,
        skip: Callable[[int], bool],
        on_failure: Callable[[SourceFailure], None],
        *,
        start: int = 0,
        first_wait: float,
        max_wait: float,
        give_up_after: float,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ):
        """``start``: the first micro-batch to hand out; ``skip``: later ones never to hand out (those a
        saved position says are finished)."""
        self.open_stream, self.skip, self.on_failure, self.start = open_stream, skip, on_failure, start
        self.first_wait, self.max_wait, self.give_up_after = first_wait, max_wait, give_up_after
        self.sleep, self.clock = sleep, clock

    def __iter__(self) -> Iterator[StreamBatch]:
        next_index, failures, failing_since = self.start, 0, None
        while True:
            stream = self.open_stream(next_index, self.skip)
            try:
                for batch in stream:
                    failures, failing_since = 0, None
                    next_index = batch.index + 1
                    yield batch
                return
            except Exception as e:  # the source's errors come in every type (OSError, HTTP, fsspec, aiohttp)
                now = self.clock()
                failing_since = failing_since if failing_since is not None else now
                if now - failing_since >= self.give_up_after:
                    raise DataSourceGaveUp(f"reading the training data failed for {now - failing_since:.0f}s, "
                                           f"{failures + 1} times in a row (last: {describe_error(e)})") from e
                failures += 1
                wait = min(self.first_wait * 2 ** (failures - 1), self.max_wait)
                self.on_failure(SourceFailure(describe_error(e), failures, wait, next_index))
                self.sleep(wait)
