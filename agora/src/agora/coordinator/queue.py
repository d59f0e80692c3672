"""Queue arithmetic: free slots, who is admitted next, how long a place in line will take (measured from
how often nodes leave the run, not assumed)."""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Sequence


class QueueStatus(enum.StrEnum):
    """Where one join request stands; the values are what the database stores."""

    WAITING = "waiting"
    ADMITTED = "admitted"
    DROPPED = "dropped"


class DropReason(enum.StrEnum):
    """Why a waiting request lost its place; the values are what the database and ``/metrics`` show."""

    SLOW_DOWNLOAD = "download_too_slow"
    ABANDONED = "abandoned"


@dataclasses.dataclass(frozen=True)
class Waiting:
    """What the admission rule needs to know about one waiting request."""

    request_id: str
    ready: bool
    """Its stage's weights are downloaded (or there is nothing to download)."""


def free_slots(capacity: int, active: int) -> int:
    return max(0, capacity - active)


def pick_admissions(waiting: Sequence[Waiting], free: int, joins_paused: bool) -> list[str]:
    """First come, first served among the ready: a slow download keeps its place but does not
    hold up the ready nodes behind it."""
    if joins_paused or free <= 0:
        return []
    return [w.request_id for w in waiting if w.ready][:free]


def departure_interval(departure_times: Sequence[float]) -> float | None:
    """Mean seconds between recent departures (nodes whose access ended), the rate at which places in
    a full run free up; None until two have been seen (no honest estimate before)."""
    times = sorted(departure_times)
    if len(times) < 2:
        return None
    span = times[-1] - times[0]
    return span / (len(times) - 1) if span > 0 else None


def estimated_wait_s(position: int, interval_s: float | None, joins_paused: bool) -> float | None:
    """Seconds until the node at ``position`` (1-based) is admitted; None while joins are paused or
    before the departure rate is known."""
    if joins_paused or interval_s is None:
        return None
    return max(0.0, position * interval_s)


def next_poll_s(wait_s: float | None, poll_interval_s: float) -> float:
    """Poll at the configured interval, sooner when admission is expected sooner, never faster than 1 s."""
    if wait_s is None:
        return poll_interval_s
    return max(1.0, min(poll_interval_s, math.ceil(wait_s)))
