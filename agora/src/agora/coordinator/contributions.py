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

from sqlalchemy import select
from sqlalchemy.orm import Session

from agora.coordinator.config import ContributionConfig
from agora.coordinator.db import ActiveNode, Contribution
from agora.protocol import HeartbeatRequest

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


def record_heartbeat(s: Session, node: ActiveNode, body: HeartbeatRequest, now: float,
                     limits: ContributionConfig, lifetime_s: float) -> None:
    """Credit what the heartbeat adds to the node's record for its stage, and remember what it reported."""
    record = s.scalar(select(Contribution).where(Contribution.peer_id == node.peer_id, Contribution.stage == node.stage))
    if record is None:
        record = Contribution(peer_id=node.peer_id, user_id=node.user_id, stage=node.stage,
                              samples=0, tokens=0, seconds_online=0.0, updated_at=now)
        s.add(record)
    # a long silence is not time online, nor time to have worked in: cap it at one access lifetime
    elapsed = min(max(0.0, now - (node.last_heartbeat_at or node.granted_at)), lifetime_s)
    same_session = body.session == node.reporting_session
    samples_before = node.reported_samples if same_session else 0
    tokens_before = node.reported_tokens if same_session else 0
    added_samples = credit(body.samples_processed, samples_before, limits.max_samples_per_second * (elapsed + limits.slack_s))
    added_tokens = credit(body.tokens_processed, tokens_before, limits.max_tokens_per_second * (elapsed + limits.slack_s))
    record.samples = saturating_add(record.samples, added_samples)
    record.tokens = saturating_add(record.tokens, added_tokens)
    if node.last_heartbeat_at is not None:
        record.seconds_online += elapsed
    record.updated_at = now
    # what was reported, not what was credited: work over the bound is forfeited, not owed later
    node.reported_samples = max(samples_before, body.samples_processed)
    node.reported_tokens = max(tokens_before, body.tokens_processed)
    node.reporting_session = body.session
    node.last_heartbeat_at, node.last_sent_at = now, body.sent_at
