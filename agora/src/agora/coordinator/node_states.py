"""Each node's state as the dashboard shows it, and every change of it, kept in the database.

The coordinator calls these inside its own transactions at the moments a node's standing changes
(joined, downloading, admitted, heartbeat, lapsed, gone); the dashboard and the wait estimate read
the results. "Lapsed" is the coordinator's own verdict on a node that holds access but has stopped
reporting: it no longer counts as serving its stage, though its place is only freed at expiry.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from agora.coordinator.db import ActiveNode, NodeState, NodeTransition

QUEUED, DOWNLOADING, STARTING, WARMING_UP, TRAINING, LAPSED = "queued", "downloading", "starting", "warming_up", "training", "lapsed"
LEFT, EXPIRED, STOPPED, RESTARTED, DROPPED = "left", "expired", "stopped", "restarted", "dropped"
WAITING_STATES = (QUEUED, DOWNLOADING)
SERVING_STATES = (STARTING, WARMING_UP, TRAINING)
DEPARTURES = (LEFT, EXPIRED, STOPPED)
"""Ends that free a place in the run (a restart takes its place straight back; a queue drop held none)."""


def set_state(s: Session, peer_id: str, user_id: int, stage: str, state: str, now: float) -> NodeState:
    """Record ``state`` for the node; a change (of state or stage) is also added to its timeline."""
    row = s.get(NodeState, peer_id)
    if row is None:
        row = NodeState(peer_id=peer_id, user_id=user_id, stage=stage, state=state, since=now, updated_at=now)
        s.add(row)
        s.add(NodeTransition(peer_id=peer_id, at=now, state=state, stage=stage))
        return row
    if row.state != state or row.stage != stage:
        row.state, row.stage, row.since = state, stage, now
        s.add(NodeTransition(peer_id=peer_id, at=now, state=state, stage=stage))
    row.user_id, row.updated_at = user_id, now
    return row


def end_node(s: Session, node: ActiveNode, how: str, now: float) -> None:
    """The node's access ends (``how``: left, expired, stopped or restarted); the caller deletes the row."""
    set_state(s, node.peer_id, node.user_id, node.stage, how, now)


def heard_from(s: Session, node: ActiveNode, phase: str | None, now: float) -> None:
    """A heartbeat arrived: the node does what it says (training unless it says it is warming up)."""
    row = set_state(s, node.peer_id, node.user_id, node.stage, phase or TRAINING, now)
    row.phase, row.last_heartbeat_at = phase or TRAINING, now


def mark_lapsed(s: Session, lapse_after_s: float, now: float) -> None:
    """Nodes holding access that have been silent for ``lapse_after_s`` (since their last heartbeat, or
    since admission if none came) become lapsed."""
    for node in s.scalars(select(ActiveNode)):
        row = s.get(NodeState, node.peer_id)
        if row is None or row.state == LAPSED:
            continue
        last = row.last_heartbeat_at if row.last_heartbeat_at is not None else node.granted_at
        if now - last > lapse_after_s:
            set_state(s, node.peer_id, node.user_id, node.stage, LAPSED, now)


def departure_times(s: Session, limit: int) -> list[float]:
    """When the latest ``limit`` departures happened (newest first)."""
    query = (select(NodeTransition.at).where(NodeTransition.state.in_(DEPARTURES))
             .order_by(NodeTransition.at.desc()).limit(limit))
    return list(s.scalars(query))
