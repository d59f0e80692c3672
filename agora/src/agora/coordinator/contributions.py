"""How much of a heartbeat's reported work the coordinator credits.

A heartbeat reports totals since the node's access was granted. What it adds over the last report
is credited only up to what a node of its stage could have done in the time since (the rates in
``ContributionConfig``), so a forged heartbeat cannot claim a year of work. A worker that restarts
sends a new session id: its totals then start again from zero; a lower total within the same
session credits nothing. Every stored counter saturates at ``COUNTER_MAX``, and sums over nodes are
taken in Python, so no node's numbers can overflow the database's 64-bit integers.
"""

from __future__ import annotations

import math
from typing import Iterable

COUNTER_MAX = 2**53
"""Largest value a stored counter takes: exact as a float, so the dashboard's JavaScript shows it right."""


def credit(reported: int, baseline: int, allowance: float) -> int:
    """Work to credit for a report of ``reported`` when ``baseline`` was credited before in this session."""
    if reported <= baseline:
        return 0
    return min(reported - baseline, max(0, math.floor(allowance)))


def saturating_add(total: int, increase: int) -> int:
    return min(COUNTER_MAX, int(total) + increase)


def total(values: Iterable[int | float | None]) -> int:
    """Sum of stored counters, as a Python integer (SQL's SUM overflows on 64-bit integers)."""
    return sum(int(v) for v in values if v is not None)
