"""Who holds a place in the run and who waits for one: access that runs out, waiting requests that are
dropped, admissions into free places, the stage a newcomer gets and how long a place in line will take.
Every method works inside the caller's transaction."""

from __future__ import annotations

import secrets

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from agora.coordinator import assignment, queue
from agora.coordinator import node_states as ns
from agora.coordinator.config import CoordinatorConfig
from agora.coordinator.db import ActiveNode, IdentityBinding, QueueRequest, StageCheckpoint
from agora.coordinator.queue import DropReason, QueueStatus
from agora.coordinator.stages import StagePlan


class Roster:
    def __init__(self, config: CoordinatorConfig, stages: StagePlan):
        self.config, self.stages = config, stages

    @staticmethod
    def forgive_downtime(s: Session, now: float) -> None:
        """Waiting nodes could not poll while the coordinator was down; that must not cost them their place."""
        for request in s.scalars(select(QueueRequest).where(QueueRequest.status == QueueStatus.WAITING)):
            request.last_poll_at = max(request.last_poll_at, now)

    def expire(self, s: Session, now: float) -> None:
        """End the access that has run out; drop the waiting requests that stopped polling or downloading."""
        for node in s.scalars(select(ActiveNode).where(ActiveNode.expires_at <= now)):
            # the moment it ran out, not the moment we noticed: the wait estimate measures departures
            ns.end_node(s, node, ns.EXPIRED, min(now, node.expires_at))
            s.delete(node)
        q = self.config.queue
        for request in s.scalars(select(QueueRequest).where(QueueRequest.status == QueueStatus.WAITING)):
            if request.last_poll_at < now - q.abandon_after_s:
                request.status, request.drop_reason = QueueStatus.DROPPED, DropReason.ABANDONED
            elif not request.download_complete and request.enqueued_at < now - q.download_deadline_s:
                request.status, request.drop_reason = QueueStatus.DROPPED, DropReason.SLOW_DOWNLOAD
            else:
                continue
            ns.set_state(s, request.peer_id, request.user_id, request.stage, ns.DROPPED, now)
        s.flush()

    def admit(self, s: Session, now: float) -> None:
        waiting = self.waiting(s)
        active = s.scalar(select(func.count()).select_from(ActiveNode))
        chosen = set(queue.pick_admissions(
            [queue.Waiting(r.request_id, r.download_complete) for r in waiting],
            queue.free_slots(self.config.queue.capacity, active), self.config.queue.joins_paused))
        for request in waiting:
            if request.request_id not in chosen:
                continue
            request.status, request.admitted_at, request.waited = QueueStatus.ADMITTED, now, now > request.enqueued_at
            s.add(ActiveNode(uid=secrets.token_hex(8), peer_id=request.peer_id, user_id=request.user_id,
                             stage=request.stage, granted_at=now, expires_at=now + self.config.access_token_lifetime_s))
            s.get(IdentityBinding, request.peer_id).last_stage = request.stage
            state = ns.set_state(s, request.peer_id, request.user_id, request.stage, ns.STARTING, now)
            state.phase, state.last_heartbeat_at = None, None
        s.flush()

    @staticmethod
    def waiting(s: Session) -> list[QueueRequest]:
        """Waiting requests in queue order."""
        return list(s.scalars(select(QueueRequest).where(QueueRequest.status == QueueStatus.WAITING).order_by(QueueRequest.seq)))

    def stage_for(self, s: Session, previous: str | None) -> str:
        """The stage a joining node serves; waiting requests count as workers of the stage they will serve."""
        workers = self.workers_per_stage(s)
        for stage in s.scalars(select(QueueRequest.stage).where(QueueRequest.status == QueueStatus.WAITING)):
            workers[stage] = workers.get(stage, 0) + 1
        return assignment.choose_stage(self.stages.needs, workers, previous, self.config.stage_hysteresis)

    @staticmethod
    def workers_per_stage(s: Session) -> dict[str, int]:
        rows = s.execute(select(ActiveNode.stage, func.count()).group_by(ActiveNode.stage))
        return {stage: count for stage, count in rows}

    def departure_interval(self, s: Session) -> tuple[float | None, int]:
        """The mean interval between recent departures, and how many departures it rests on."""
        times = ns.departure_times(s, self.config.queue.wait_estimate_window)
        return queue.departure_interval(times), len(times)

    def wait_estimate(self, s: Session, position: int) -> float | None:
        interval, _ = self.departure_interval(s)
        return queue.estimated_wait_s(position, interval, self.config.queue.joins_paused)

    def download_required(self, s: Session, stage: str) -> bool:
        if self.config.checkpoint_url_template is not None:
            return True
        # a coordinator that serves checkpoints has nothing to hand out before a stage's first upload
        return self.config.serves_checkpoints and s.get(StageCheckpoint, stage) is not None
