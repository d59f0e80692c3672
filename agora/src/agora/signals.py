"""How SIGINT and SIGTERM stop an Agora process: they set one process-wide Event, which the main
loop watches so that it leaves through its ``finally`` (checkpoint, goodbye, children stopped)."""

from __future__ import annotations

import signal
import threading

STOP = threading.Event()


def stop_on_signals() -> threading.Event:
    """Route SIGINT and SIGTERM to ``STOP`` and return it. Entry points call this before their heavy
    imports: a Ctrl+C that lands inside an import otherwise surfaces as whatever that library makes
    of the interruption (numpy's lazy attributes turn it into a RecursionError, exit code 1)."""
    signal.signal(signal.SIGINT, _set)
    signal.signal(signal.SIGTERM, _set)
    return STOP


def _set(signum, frame) -> None:
    STOP.set()
