"""Nodes holding access: renewals, signed heartbeats (their work credited, their goodbye), an operator's
stop, and the move of a node to a stage that has run dry."""

from __future__ import annotations

import base64
import binascii
from typing import Callable

from sqlalchemy import select
from sqlalchemy.orm import Session

from agora_server.peer_keys import verify_signature

from agora.coordinator import assignment, contributions
from agora.coordinator import node_states as ns
from agora.coordinator.callers import Callers
from agora.coordinator.config import CoordinatorConfig
from agora.coordinator.db import ActiveNode, IdentityBinding, NodeStop, User
from agora.coordinator.errors import CoordinatorRefusal, Refusal
from agora.coordinator.grants import AccessGrants
from agora.coordinator.ledger import Ledger
from agora.coordinator.reports import Reports
from agora.coordinator.roster import Roster
from agora.protocol import AccessAnswer, HeartbeatAnswer, HeartbeatRequest, RefreshRequest, StopNodeAnswer, StopNodeRequest
from agora.coordinator.stages import StagePlan


class NodeSessions:
    def __init__(self, config: CoordinatorConfig, stages: StagePlan, ledger: Ledger, callers: Callers, grants: AccessGrants,
                 roster: Roster, reports: Reports, clock: Callable[[], float]):
        self.config, self.stages, self._ledger, self._callers, self._grants = config, stages, ledger, callers, grants
        self._roster, self._reports, self._clock = roster, reports, clock

    def refresh(self, token: str | None, body: RefreshRequest, base_url: str | None = None) -> AccessAnswer:
        username = self._callers.username(token)
        with self._ledger.transaction() as s:
            now = self._clock()
            node, user = self._own_active_node(s, username, body.peer_id, body.uid, now)
            node.expires_at = now + self.config.access_token_lifetime_s
            return self._grants.worker(s, node, user, base_url)

    def heartbeat(self, token: str | None, raw_body: bytes, body: HeartbeatRequest, signature_b64: str) -> HeartbeatAnswer:
        username = self._callers.username(token)
        try:
            signature = base64.b64decode(signature_b64, validate=True)
        except (binascii.Error, ValueError):
            raise CoordinatorRefusal(Refusal.BAD_SIGNATURE) from None
        with self._ledger.transaction() as s:
            now = self._clock()
            binding = s.get(IdentityBinding, body.peer_id)
            if binding is None or not verify_signature(base64.b64decode(binding.public_key), raw_body, signature):
                raise CoordinatorRefusal(Refusal.BAD_SIGNATURE)
            node, user = self._own_active_node(s, username, body.peer_id, body.uid, now)
            if abs(body.sent_at - now) > self.config.max_heartbeat_skew_s:
                raise CoordinatorRefusal(Refusal.CLOCK_SKEW, skew=body.sent_at - now)
            if node.last_sent_at is not None and body.sent_at <= node.last_sent_at:
                raise CoordinatorRefusal(Refusal.STALE_HEARTBEAT)
            contributions.record_heartbeat(s, node, body, now, self.config.contributions, self.config.access_token_lifetime_s)
            if body.leaving:  # its place frees up now, not when its access would have run out
                ns.end_node(s, node, ns.LEFT, now)
                s.delete(node)
                return HeartbeatAnswer(expires_at=now)
            ns.heard_from(s, node, body.phase, now)
            self._roster.expire(s, now)  # a stage counts as empty only once its last node's access has run out
            self._reports.sample_if_due(s, now)
            return self._maybe_move(s, node, user)

    def stop_node(self, token: str | None, body: StopNodeRequest) -> StopNodeAnswer:
        """An operator withdraws a node's access at once; its next heartbeat or refresh is refused with the reason."""
        username = self._callers.operator(token)
        with self._ledger.transaction() as s:
            node = s.scalar(select(ActiveNode).where(ActiveNode.peer_id == body.peer_id))
            if node is not None:
                ns.end_node(s, node, ns.STOPPED, self._clock())
                s.delete(node)
            if s.get(IdentityBinding, body.peer_id) is not None:
                s.merge(NodeStop(peer_id=body.peer_id, reason=body.reason, operator=username, at=self._clock()))
            return StopNodeAnswer(peer_id=body.peer_id, was_active=node is not None)

    def _own_active_node(self, s: Session, username: str, peer_id: str, uid: str, now: float) -> tuple[ActiveNode, User]:
        binding = s.get(IdentityBinding, peer_id)
        user = s.scalar(select(User).where(User.username == username))
        if binding is None or user is None or binding.user_id != user.id:
            raise CoordinatorRefusal(Refusal.NOT_YOUR_NODE)
        node = s.get(ActiveNode, uid)
        if node is None or node.peer_id != peer_id or node.expires_at <= now:
            stopped = s.get(NodeStop, peer_id)
            if stopped is not None:
                raise CoordinatorRefusal(Refusal.NODE_STOPPED, reason=stopped.reason)
            raise CoordinatorRefusal(Refusal.ACCESS_EXPIRED)
        return node, user

    def _maybe_move(self, s: Session, node: ActiveNode, user: User) -> HeartbeatAnswer:
        nodes = [assignment.NodeOnStage(n.uid, n.stage, n.granted_at) for n in s.scalars(select(ActiveNode))]
        move = assignment.choose_move(self.stages.needs, nodes)
        if move is None or move.uid != node.uid:
            return HeartbeatAnswer(expires_at=node.expires_at)
        node.stage = move.to_stage
        # counters restart on the new stage, so the next heartbeat's totals are all new work there
        node.reported_samples = node.reported_tokens = 0
        s.get(IdentityBinding, node.peer_id).last_stage = move.to_stage
        return HeartbeatAnswer(expires_at=node.expires_at, move_to_stage=move.to_stage,
                               access_token=self._grants.worker(s, node, user).access_token)
