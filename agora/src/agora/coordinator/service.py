"""The coordinator's rules, independent of HTTP: one object composed of the parts that each keep one
job, so that ``app.py`` has a single thing to call.

- ``Admission``        join and the polls of a queued node
- ``NodeSessions``     renewals, heartbeats, operator stops, moves to an emptied stage
- ``CheckpointAccess`` who may upload or download a stage's checkpoint
- ``AccessGrants``     trainer access (worker access is granted by the parts above)
- ``TrainerShards``    the shard of the run's data each trainer reads
- ``Reports``          run info, dashboard data, totals, contributions, trainers' reports

They share one ``Ledger`` (the database under one lock) and one ``Roster`` (places in the run and the queue).
"""

from __future__ import annotations

import time
from typing import Callable

from agora.coordinator import porttest
from agora.coordinator.admission import Admission, PortProbe
from agora.coordinator.callers import Callers
from agora.coordinator.checkpoint_access import CheckpointAccess
from agora.coordinator.checkpoints import Uploader
from agora.coordinator.config import CoordinatorConfig
from agora.coordinator.db import Database
from agora.coordinator.grants import AccessGrants
from agora.coordinator.ledger import Ledger
from agora.coordinator.node_sessions import NodeSessions
from agora.coordinator.reports import Reports, RunTotals
from agora.coordinator.roster import Roster
from agora.protocol import (
    AccessAnswer,
    ContributionInfo,
    HeartbeatAnswer,
    HeartbeatRequest,
    HistoryAnswer,
    JoinRequest,
    NodeInfo,
    QueuedAnswer,
    RefreshRequest,
    RunInfo,
    StatusRequest,
    StopNodeAnswer,
    StopNodeRequest,
    TrainerAccessRequest,
    TrainingReport,
)
from agora.coordinator.signing import AccessSigner
from agora.coordinator.stages import StagePlan
from agora.coordinator.tokens import TokenVerifier
from agora.coordinator.trainer_shards import TrainerShards

__all__ = ["Coordinator", "PortProbe", "RunTotals"]


class Coordinator:
    def __init__(self, config: CoordinatorConfig, stages: StagePlan, db: Database, verifier: TokenVerifier,
                 signer: AccessSigner, probe: PortProbe = porttest.probe, clock: Callable[[], float] = time.time,
                 *, data_shards: int = 1):
        self.signer = signer
        ledger, roster = Ledger(db), Roster(config, stages)
        self._callers = callers = Callers(verifier, config.operators)
        self._grants = grants = AccessGrants(config, signer, clock)
        self._admission = Admission(config, ledger, callers, grants, roster, probe, clock)
        self._reports = reports = Reports(config, stages, ledger, callers, roster, signer.public_key, clock)
        self._sessions = NodeSessions(config, stages, ledger, callers, grants, roster, reports, clock)
        self._checkpoints = CheckpointAccess(stages, ledger, callers, signer.public_key, clock)
        self._trainer_shards = TrainerShards(data_shards, ledger, clock)
        with ledger.transaction() as s:
            roster.forgive_downtime(s, clock())

    def join(self, token: str | None, body: JoinRequest, source_ip: str,
             base_url: str | None = None) -> AccessAnswer | QueuedAnswer:
        return self._admission.join(token, body, source_ip, base_url)

    def authorization_status(self, token: str | None, body: StatusRequest,
                             base_url: str | None = None) -> AccessAnswer | QueuedAnswer:
        return self._admission.authorization_status(token, body, base_url)

    def trainer_access(self, token: str | None, body: TrainerAccessRequest) -> AccessAnswer:
        """Access to call every stage and the trainer's shard of the data, for an operator's trainer;
        asked again to renew it."""
        return self._trainer_shards.assign(self._grants.trainer(self._callers.operator(token), body))

    def refresh(self, token: str | None, body: RefreshRequest, base_url: str | None = None) -> AccessAnswer:
        return self._sessions.refresh(token, body, base_url)

    def heartbeat(self, token: str | None, raw_body: bytes, body: HeartbeatRequest, signature_b64: str) -> HeartbeatAnswer:
        return self._sessions.heartbeat(token, raw_body, body, signature_b64)

    def stop_node(self, token: str | None, body: StopNodeRequest) -> StopNodeAnswer:
        return self._sessions.stop_node(token, body)

    def authorize_upload(self, access_token: str | None, stage: str) -> Uploader:
        return self._checkpoints.authorize_upload(access_token, stage)

    def authorize_download(self, token: str | None, stage: str) -> None:
        return self._checkpoints.authorize_download(token, stage)

    def training_report(self, token: str | None, body: TrainingReport) -> None:
        self._reports.training_report(token, body)

    def run_info(self) -> RunInfo:
        return self._reports.run_info()

    def history(self, since: float = 0.0) -> HistoryAnswer:
        return self._reports.history(since)

    def nodes(self, peer_id: str | None = None) -> list[NodeInfo]:
        return self._reports.nodes(peer_id)

    def sample(self) -> None:
        self._reports.sample()

    def totals(self) -> RunTotals:
        return self._reports.totals()

    def contributions(self) -> list[ContributionInfo]:
        return self._reports.contributions()
