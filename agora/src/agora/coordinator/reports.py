"""What the coordinator tells about the run: run info, the dashboard's history and node list, totals for
``/metrics``, contributions, and the trainers' progress reports it keeps for the charts."""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from agora.coordinator import contributions, history, queue
from agora.coordinator import node_states as ns
from agora.coordinator.callers import Callers
from agora.coordinator.config import CoordinatorConfig
from agora.coordinator.db import Contribution, QueueRequest, User
from agora.coordinator.ledger import Ledger
from agora.coordinator.queue import QueueStatus
from agora.coordinator.roster import Roster
from agora.protocol import ContributionInfo, HistoryAnswer, NodeInfo, RunInfo, StageInfo, TrainingReport
from agora.coordinator.stages import StagePlan


@dataclasses.dataclass(frozen=True)
class RunTotals:
    """Counts since the run began, read from the database so a restart does not reset them."""

    admissions: dict[str, int]
    """Per stage."""
    queue_drops: dict[str, int]
    """Per reason (download_too_slow, abandoned)."""
    samples: dict[str, int]
    tokens: dict[str, int]


class Reports:
    def __init__(self, config: CoordinatorConfig, stages: StagePlan, ledger: Ledger, callers: Callers, roster: Roster,
                 coordinator_public_key: str, clock: Callable[[], float]):
        self.config, self.stages, self._ledger, self._callers, self._roster = config, stages, ledger, callers, roster
        self._public_key, self._clock = coordinator_public_key, clock
        self._last_sample = -float("inf")

    def run_info(self) -> RunInfo:
        with self._ledger.transaction() as s:
            now = self._clock()
            self._refresh_states(s, now)
            counts = history.stage_counts(s, self.stages.names)
            active = sum(self._roster.workers_per_stage(s).values())
            waiting = len(self._roster.waiting(s))
            return RunInfo(
                run_name=self.config.run_name,
                stages=[_stage_info(name, need, counts[name]) for name, need in self.stages.needs.items()],
                capacity=self.config.queue.capacity, active_nodes=active, queue_length=waiting,
                estimated_wait_seconds=self._newcomer_wait(s, waiting, active),
                wait_estimate_basis=self._wait_basis(s, waiting, active),
                joins_paused=self.config.queue.joins_paused, coordinator_public_key=self._public_key,
            )

    def history(self, since: float = 0.0) -> HistoryAnswer:
        with self._ledger.transaction() as s:
            now = self._clock()
            self._refresh_states(s, now)
            return history.history(s, self.config, self.stages.names, since, now)

    def nodes(self, peer_id: str | None = None) -> list[NodeInfo]:
        with self._ledger.transaction() as s:
            self._refresh_states(s, self._clock())
            return history.nodes(s, self.config, self.stages.names, peer_id)

    def sample(self) -> None:
        """Called periodically, so the charts go on while nobody calls (nodes gone silent lapse then too)."""
        with self._ledger.transaction() as s:
            self._refresh_states(s, self._clock())

    def sample_if_due(self, s: Session, now: float) -> None:
        if now - self._last_sample < self.config.dashboard.sample_interval_s:
            return
        s.flush()
        history.take_sample(s, self.stages.names, now)
        self._last_sample = now

    def training_report(self, token: str | None, body: TrainingReport) -> None:
        """A trainer's progress for the charts; like trainer access, operators only."""
        self._callers.operator(token)
        with self._ledger.transaction() as s:
            history.record_training(s, body, self._clock())

    def totals(self) -> RunTotals:
        with self._ledger.read() as s:
            admissions = s.execute(select(QueueRequest.stage, func.count())
                                   .where(QueueRequest.status == QueueStatus.ADMITTED).group_by(QueueRequest.stage))
            drops = s.execute(select(QueueRequest.drop_reason, func.count())
                              .where(QueueRequest.status == QueueStatus.DROPPED).group_by(QueueRequest.drop_reason))
            samples, tokens = collections.defaultdict(list), collections.defaultdict(list)
            for stage, stage_samples, stage_tokens in s.execute(select(Contribution.stage, Contribution.samples, Contribution.tokens)):
                samples[stage].append(stage_samples)
                tokens[stage].append(stage_tokens)
            return RunTotals(admissions=dict(admissions.all()),
                             queue_drops={str(reason): count for reason, count in drops.all()},
                             samples={stage: contributions.total(values) for stage, values in samples.items()},
                             tokens={stage: contributions.total(values) for stage, values in tokens.items()})

    def contributions(self) -> list[ContributionInfo]:
        with self._ledger.read() as s:
            rows = s.execute(select(Contribution, User.username).join(User, Contribution.user_id == User.id)
                             .order_by(Contribution.id))
            return [ContributionInfo(username=name, peer_id=c.peer_id, stage=c.stage, samples=int(c.samples),
                                     tokens=int(c.tokens), seconds_online=c.seconds_online) for c, name in rows]

    def _refresh_states(self, s: Session, now: float) -> None:
        """Expiries, admissions and lapses as of now, and a sample for the charts if one is due."""
        self._roster.expire(s, now)
        self._roster.admit(s, now)
        ns.mark_lapsed(s, self.config.dashboard.lapse_after_s, now)
        self.sample_if_due(s, now)

    def _newcomer_wait(self, s: Session, waiting: int, active: int) -> float | None:
        if not waiting and not self.config.queue.joins_paused and queue.free_slots(self.config.queue.capacity, active):
            return 0.0
        return self._roster.wait_estimate(s, waiting + 1)

    def _wait_basis(self, s: Session, waiting: int, active: int) -> str:
        if self.config.queue.joins_paused:
            return "joins are paused"
        if not waiting and queue.free_slots(self.config.queue.capacity, active):
            return "the run has free places"
        interval, seen = self._roster.departure_interval(s)
        if interval is None:
            return "not known yet: the run is full and fewer than two nodes have left it so far"
        return f"a place freed up every {interval:.0f}s on average over the last {seen} departures"


def _stage_info(name: str, need: int, count: collections.Counter) -> StageInfo:
    serving = sum(count[state] for state in ns.SERVING_STATES)
    return StageInfo(name=name, need=need, workers=serving + count[ns.LAPSED], serving=serving,
                     training=count[ns.TRAINING], warming_up=count[ns.WARMING_UP], lapsed=count[ns.LAPSED],
                     queued=count["queued"])
