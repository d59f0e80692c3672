"""The dashboard's data: workers per stage sampled over time, the trainers' reports, and each node
with its state, contribution and timeline. Reads and samples only; the rules live in ``service``."""

from __future__ import annotations

import collections
from typing import Sequence, TypeVar

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from agora.coordinator import contributions
from agora.coordinator import node_states as ns
from agora.coordinator.config import CoordinatorConfig
from agora.coordinator.db import (
    ActiveNode,
    Contribution,
    NodeState,
    NodeTransition,
    QueueRequest,
    StageSample,
    TrainingPoint,
    User,
)
from agora.coordinator.queue import QueueStatus
from agora.protocol import HistoryAnswer, NodeInfo, StageSampleInfo, TimelineEntry, TrainingReport, TrainingSample

T = TypeVar("T")
ENDED_SHOWN = 50
"""Nodes that have gone, newest first, that the node list still shows."""


def thin(rows: Sequence[T], most: int) -> list[T]:
    """At most ``most`` rows, evenly spread, first and last kept."""
    if len(rows) <= most:
        return list(rows)
    step = (len(rows) - 1) / (most - 1)
    return [rows[round(i * step)] for i in range(most)]


def stage_counts(s: Session, stages: Sequence[str]) -> dict[str, collections.Counter]:
    """Per stage: nodes holding access by state (starting, warming_up, training, lapsed), and ``queued``."""
    counts = {stage: collections.Counter() for stage in stages}
    rows = s.execute(select(ActiveNode.stage, NodeState.state).join(NodeState, NodeState.peer_id == ActiveNode.peer_id, isouter=True))
    for stage, state in rows:
        counts.setdefault(stage, collections.Counter())[state or ns.STARTING] += 1
    for stage, waiting in s.execute(select(QueueRequest.stage, func.count()).where(QueueRequest.status == QueueStatus.WAITING)
                                    .group_by(QueueRequest.stage)):
        counts.setdefault(stage, collections.Counter())["queued"] += waiting
    return counts


def take_sample(s: Session, stages: Sequence[str], now: float) -> None:
    for stage, count in stage_counts(s, stages).items():
        s.add(StageSample(at=now, stage=stage, training=count[ns.TRAINING], warming_up=count[ns.WARMING_UP],
                          starting=count[ns.STARTING], lapsed=count[ns.LAPSED], queued=count["queued"]))


def record_training(s: Session, body: TrainingReport, now: float) -> None:
    s.add(TrainingPoint(at=now, trainer=body.peer_id, step=body.step, total_steps=body.total_steps, loss=body.loss,
                        validation_loss=body.validation_loss, tokens_per_second=body.tokens_per_second,
                        stages_served=body.stages_served, stages_total=body.stages_total, workers=body.workers,
                        dropped=body.dropped, finished=body.finished))


def history(s: Session, config: CoordinatorConfig, stages: Sequence[str], since: float, now: float) -> HistoryAnswer:
    most = config.dashboard.history_points
    points = s.scalars(select(TrainingPoint).where(TrainingPoint.at >= since).order_by(TrainingPoint.at, TrainingPoint.id)).all()
    # validation points are few and each one matters: thin only the progress reports
    validation = [p for p in points if p.validation_loss is not None]
    progress = thin([p for p in points if p.validation_loss is None], most)
    training = sorted([*progress, *validation], key=lambda p: (p.at, p.id))
    by_stage: dict[str, list[StageSample]] = {stage: [] for stage in stages}
    for row in s.scalars(select(StageSample).where(StageSample.at >= since).order_by(StageSample.at, StageSample.id)):
        by_stage.setdefault(row.stage, []).append(row)
    return HistoryAnswer(
        now=now,
        training=[TrainingSample(at=p.at, step=p.step, total_steps=p.total_steps, loss=p.loss, validation_loss=p.validation_loss,
                                 tokens_per_second=p.tokens_per_second, stages_served=p.stages_served,
                                 stages_total=p.stages_total, workers=p.workers, dropped=p.dropped, finished=p.finished)
                  for p in training],
        stages={stage: [StageSampleInfo(at=r.at, training=r.training, warming_up=r.warming_up, starting=r.starting,
                                        lapsed=r.lapsed, queued=r.queued) for r in thin(rows, most)]
                for stage, rows in by_stage.items()},
    )


def nodes(s: Session, config: CoordinatorConfig, stages: Sequence[str], peer_id: str | None = None) -> list[NodeInfo]:
    """Nodes taking part (serving, by ``stages``' pipeline order, then queued in order), then the latest
    that have gone; only the one named by ``peer_id`` if given."""
    query = select(NodeState, User.username).join(User, User.id == NodeState.user_id)
    if peer_id is not None:
        query = query.where(NodeState.peer_id == peer_id)
    rows = list(s.execute(query))
    waiting = list(s.scalars(select(QueueRequest).where(QueueRequest.status == QueueStatus.WAITING).order_by(QueueRequest.seq)))
    position = {r.peer_id: i + 1 for i, r in enumerate(waiting)}
    request = {r.peer_id: r for r in waiting}
    work = collections.defaultdict(lambda: [0, 0])
    # summed here, not with SQL's SUM: that overflows on 64-bit integers
    for pid, samples, tokens in s.execute(select(Contribution.peer_id, Contribution.samples, Contribution.tokens)):
        work[pid][0] += contributions.total([samples])
        work[pid][1] += contributions.total([tokens])
    stage_order = {stage: i for i, stage in enumerate(stages)}

    def order(item):
        row = item[0]
        if row.state in ns.WAITING_STATES:
            return (1, position.get(row.peer_id, 0), 0.0)
        if row.state in (*ns.SERVING_STATES, ns.LAPSED):
            return (0, stage_order.get(row.stage, len(stage_order)), row.since)
        return (2, 0, -row.since)

    rows.sort(key=order)
    gone = [r for r in rows if order(r)[0] == 2][:ENDED_SHOWN]
    shown = [r for r in rows if order(r)[0] < 2] + gone
    found = []
    for row, username in shown:
        changes = s.scalars(select(NodeTransition).where(NodeTransition.peer_id == row.peer_id)
                            .order_by(NodeTransition.at.desc(), NodeTransition.id.desc()).limit(config.dashboard.timeline_changes)).all()
        queued = request.get(row.peer_id)
        found.append(NodeInfo(
            peer_id=row.peer_id, username=username, stage=row.stage, state=row.state, since=row.since,
            last_heartbeat_at=row.last_heartbeat_at, queue_position=position.get(row.peer_id),
            download_bytes=queued.download_bytes if queued else None, download_total=queued.download_total if queued else None,
            samples=work[row.peer_id][0], tokens=work[row.peer_id][1],
            timeline=[TimelineEntry(at=c.at, state=c.state, stage=c.stage) for c in reversed(changes)],
        ))
    return found
