"""Joining the run: who may join (account, identity, version, per-account limit), the port test, the
place in the queue, and the polls of a queued node until it is admitted or dropped.

The port test, the slow part of a join, runs outside the lock between a read-only check of the rules
and the write that checks them again."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Callable

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from agora.coordinator import node_states as ns
from agora.coordinator import queue
from agora.coordinator.callers import Callers
from agora.coordinator.config import CoordinatorConfig
from agora.coordinator.db import ActiveNode, IdentityBinding, NodeStop, QueueRequest, User
from agora.coordinator.errors import CoordinatorRefusal, Refusal
from agora.coordinator.grants import AccessGrants, check_public_key
from agora.coordinator.ledger import Ledger
from agora.coordinator.queue import DropReason, QueueStatus
from agora.coordinator.roster import Roster
from agora.protocol import AccessAnswer, JoinRequest, QueuedAnswer, StatusRequest

PortProbe = Callable[[str, int, float], bool]


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


class Admission:
    def __init__(self, config: CoordinatorConfig, ledger: Ledger, callers: Callers, grants: AccessGrants, roster: Roster,
                 probe: PortProbe, clock: Callable[[], float]):
        self.config, self._ledger, self._callers, self._grants, self._roster = config, ledger, callers, grants, roster
        self._probe, self._clock = probe, clock

    def join(self, token: str | None, body: JoinRequest, source_ip: str,
             base_url: str | None = None) -> AccessAnswer | QueuedAnswer:
        username = self._callers.username(token)
        if self.config.accepted_code_versions and body.code_version not in self.config.accepted_code_versions:
            raise CoordinatorRefusal(Refusal.VERSION_MISMATCH)
        public_key = check_public_key(body.peer_id, body.public_key)
        target_ip = self._port_test_address(body, source_ip)

        with self._ledger.transaction() as s:  # refuse cheaply before spending a port test
            self._check_join_rules(s, username, body.peer_id)
        if not self._probe(target_ip, body.announce_port, self.config.port_test.deadline_s):
            raise CoordinatorRefusal(Refusal.PORT_TEST_FAILED)

        with self._ledger.transaction() as s:
            now = self._clock()
            user = self._check_join_rules(s, username, body.peer_id) or self._create_user(s, username, now)
            binding = s.get(IdentityBinding, body.peer_id)
            if binding is None:
                binding = IdentityBinding(peer_id=body.peer_id, user_id=user.id, public_key=public_key, created_at=now)
                s.add(binding)
                s.flush()
            stopped = s.get(NodeStop, body.peer_id)
            if stopped is not None:  # an operator's stop ends that session; joining again is a new one
                s.delete(stopped)
            # a node that restarts while it still holds access gives that slot back and joins afresh
            old = s.scalar(select(ActiveNode).where(ActiveNode.peer_id == body.peer_id))
            if old is not None:
                ns.end_node(s, old, ns.RESTARTED, now)
                s.delete(old)
                s.flush()
            self._roster.expire(s, now)
            session_token = secrets.token_urlsafe(32)
            stage = self._roster.stage_for(s, binding.last_stage)
            request = QueueRequest(
                request_id=secrets.token_hex(16), session_token_sha256=_digest(session_token),
                peer_id=body.peer_id, user_id=user.id, status=QueueStatus.WAITING,
                stage=stage, enqueued_at=now, last_poll_at=now,
                download_complete=not self._roster.download_required(s, stage),
                device=body.device, vram_gb=body.vram_gb, ram_gb=body.ram_gb, bandwidth_mbps=body.bandwidth_mbps,
                latency_ms=body.latency_ms, announce_ip=target_ip, announce_port=body.announce_port,
                code_version=body.code_version, email=body.email,
            )
            s.add(request)
            s.flush()
            ns.set_state(s, body.peer_id, user.id, stage, ns.QUEUED if request.download_complete else ns.DOWNLOADING, now)
            self._roster.admit(s, now)
            return self._answer(s, request, user, now, session_token, base_url)

    def authorization_status(self, token: str | None, body: StatusRequest,
                             base_url: str | None = None) -> AccessAnswer | QueuedAnswer:
        username = self._callers.username(token)
        with self._ledger.transaction() as s:
            now = self._clock()
            request = s.scalar(select(QueueRequest).where(QueueRequest.request_id == body.request_id))
            if request is None:
                raise CoordinatorRefusal(Refusal.UNKNOWN_REQUEST)
            if not hmac.compare_digest(request.session_token_sha256, _digest(body.session_token)):
                raise CoordinatorRefusal(Refusal.WRONG_SESSION)
            user = s.get(User, request.user_id)
            if user.username != username:
                raise CoordinatorRefusal(Refusal.NOT_YOUR_NODE)
            if request.status == QueueStatus.WAITING:
                request.last_poll_at = now
                request.download_bytes = body.download.bytes_done
                request.download_total = body.download.bytes_total
                request.download_complete = request.download_complete or body.download.complete
                ns.set_state(s, request.peer_id, request.user_id, request.stage,
                             ns.QUEUED if request.download_complete else ns.DOWNLOADING, now)
            self._roster.expire(s, now)
            self._roster.admit(s, now)
            try:
                return self._answer(s, request, user, now, None, base_url)
            except CoordinatorRefusal as e:
                refusal = e  # raised after the commit: the drop this poll found must not roll back with it
        raise refusal

    def _port_test_address(self, body: JoinRequest, source_ip: str) -> str:
        if body.announce_ip is None:
            return source_ip
        announced = str(body.announce_ip)
        if self.config.port_test.only_source_address and announced != source_ip:
            raise CoordinatorRefusal(Refusal.FOREIGN_ANNOUNCE_IP, announced=announced, source=source_ip)
        return announced

    def _check_join_rules(self, s: Session, username: str, peer_id: str) -> User | None:
        """The account's row if it exists; CoordinatorRefusal if a rule forbids this join."""
        user = s.scalar(select(User).where(User.username == username))
        binding = s.get(IdentityBinding, peer_id)
        if binding is not None and (user is None or binding.user_id != user.id):
            raise CoordinatorRefusal(Refusal.PEER_ID_TAKEN)
        if s.scalar(select(QueueRequest).where(QueueRequest.peer_id == peer_id, QueueRequest.status == QueueStatus.WAITING)):
            raise CoordinatorRefusal(Refusal.ALREADY_QUEUED)
        if user is not None:
            now = self._clock()
            active = s.scalar(select(func.count()).select_from(ActiveNode).where(
                ActiveNode.user_id == user.id, ActiveNode.expires_at > now, ActiveNode.peer_id != peer_id))
            waiting = s.scalar(select(func.count()).select_from(QueueRequest).where(
                QueueRequest.user_id == user.id, QueueRequest.status == QueueStatus.WAITING))
            if active + waiting >= self.config.queue.max_active_per_user:
                raise CoordinatorRefusal(Refusal.TOO_MANY_NODES, count=active + waiting)
        return user

    @staticmethod
    def _create_user(s: Session, username: str, now: float) -> User:
        user = User(username=username, created_at=now)
        s.add(user)
        s.flush()
        return user

    def _answer(self, s: Session, request: QueueRequest, user: User, now: float,
                session_token: str | None, base_url: str | None) -> AccessAnswer | QueuedAnswer:
        if request.status == QueueStatus.DROPPED:
            raise CoordinatorRefusal(Refusal.DOWNLOAD_TOO_SLOW if request.drop_reason == DropReason.SLOW_DOWNLOAD
                                     else Refusal.ABANDONED)
        if request.status == QueueStatus.ADMITTED:
            node = s.scalar(select(ActiveNode).where(ActiveNode.peer_id == request.peer_id))
            if node is None:
                raise CoordinatorRefusal(Refusal.ACCESS_EXPIRED)
            return self._grants.worker(s, node, user, base_url)
        position = 1 + [r.seq for r in self._roster.waiting(s)].index(request.seq)
        wait = self._roster.wait_estimate(s, position)
        return QueuedAnswer(
            request_id=request.request_id, session_token=session_token, position=position,
            estimated_wait_seconds=wait, next_poll_seconds=queue.next_poll_s(wait, self.config.queue.poll_interval_s),
            joins_paused=self.config.queue.joins_paused, stage=request.stage,
            download_required=self._roster.download_required(s, request.stage),
            checkpoint_url=self.config.checkpoint_url(request.stage, base_url),
        )
