"""Waiting on a state no event announces (a file on disk, a DHT record), by looking again and again."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout: float, interval: float = 0.1) -> T:
    """Call ``condition`` until it returns something truthy, which is returned; after ``timeout``,
    what it returns then (falsy: the caller's assert says what never came)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(interval)
    return condition()
