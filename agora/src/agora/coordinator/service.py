"""The coordinator's rules, independent of HTTP: join, poll, refresh, heartbeat, checkpoint uploads, run info.

Every state change happens inside one database transaction under one lock, so a single
coordinator process never interleaves two admissions. The port test, the slow part of a join,
runs outside the lock between a read-only check of the rules and the write that re-checks them.
"""

from __future__ import annotations

import base64
import binascii
import collections
import dataclasses
import hashlib
import hmac
import secrets
import threading
import time
from typing import Callable

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from agora_server.access import PREFIX as ACCESS_TOKEN_PREFIX
from agora_server.access import TRAINER, WORKER, AccessClaims, AccessTokenError, verify_access_token

from agora.coordinator import assignment, contributions, history, porttest, queue
from agora.coordinator import node_states as ns
from agora.coordinator.checkpoints import Uploader
from agora.coordinator.config import CoordinatorConfig
from agora.coordinator.db import ActiveNode, Contribution, Database, IdentityBinding, NodeStop, QueueRequest, StageCheckpoint, User
from agora.coordinator.errors import CoordinatorRefusal, Refusal
from agora_server.peer_keys import PeerKeyError, load_public_key, peer_id_of, verify_signature
from agora.protocol import (
    AccessAnswer,
    ContributionInfo,
    HeartbeatAnswer,
    HeartbeatRequest,
    HistoryAnswer,
    JoinRequest,
    NodeInfo,
    QueuedAnswer,
    StopNodeAnswer,
    StopNodeRequest,
    RefreshRequest,
    RunInfo,
    StageInfo,
    StatusRequest,
    TrainerAccessRequest,
    TrainingReport,
)
from agora.coordinator.signing import AccessSigner
from agora.coordinator.tokens import InvalidToken, TokenServiceUnavailable, TokenVerifier

WAITING, ADMITTED, DROPPED = "waiting", "admitted", "dropped"
DROPPED_SLOW_DOWNLOAD, DROPPED_ABANDONED = "download_too_slow", "abandoned"
PortProbe = Callable[[str, int, float], bool]


@dataclasses.dataclass(frozen=True)
class RunTotals:
    """Counts since the run began, read from the database so a restart does not reset them."""

    admissions: dict[str, int]
    """Per stage."""
    queue_drops: dict[str, int]
    """Per reason (download_too_slow, abandoned)."""
    samples: dict[str, int]
    tokens: dict[str, int]


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


class Coordinator:
    def __init__(self, config: CoordinatorConfig, db: Database, verifier: TokenVerifier, signer: AccessSigner,
                 probe: PortProbe = porttest.probe, clock: Callable[[], float] = time.time):
        self.config, self.db, self.verifier, self.signer = config, db, verifier, signer
        self._probe, self._clock = probe, clock
        self._lock = threading.Lock()
        self._last_sample = -float("inf")
        self._forgive_downtime()

    def _forgive_downtime(self) -> None:
        # waiting nodes could not poll while we were down; that must not cost them their place
        now = self._clock()
        with self._lock, self.db.session() as s:
            for request in s.scalars(select(QueueRequest).where(QueueRequest.status == WAITING)):
                request.last_poll_at = max(request.last_poll_at, now)

    # ---- who is calling

    def authenticate(self, token: str | None) -> str:
        if not token:
            raise CoordinatorRefusal(Refusal.INVALID_TOKEN)
        try:
            return self.verifier.username(token)
        except InvalidToken:
            raise CoordinatorRefusal(Refusal.INVALID_TOKEN) from None
        except TokenServiceUnavailable:
            raise CoordinatorRefusal(Refusal.TOKEN_SERVICE_DOWN) from None

    # ---- join

    def join(self, token: str | None, body: JoinRequest, source_ip: str,
             base_url: str | None = None) -> AccessAnswer | QueuedAnswer:
        username = self.authenticate(token)
        if self.config.accepted_code_versions and body.code_version not in self.config.accepted_code_versions:
            raise CoordinatorRefusal(Refusal.VERSION_MISMATCH)
        public_key = self._check_public_key(body.peer_id, body.public_key)
        target_ip = self._port_test_address(body, source_ip)

        with self._lock, self.db.session() as s:  # refuse cheaply before spending a port test
            self._check_join_rules(s, username, body.peer_id)
        if not self._probe(target_ip, body.announce_port, self.config.port_test.deadline_s):
            raise CoordinatorRefusal(Refusal.PORT_TEST_FAILED)

        with self._lock, self.db.session() as s:
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
            self._expire(s, now)
            session_token = secrets.token_urlsafe(32)
            stage = self._stage_for(s, binding.last_stage)
            request = QueueRequest(
                request_id=secrets.token_hex(16), session_token_sha256=_digest(session_token),
                peer_id=body.peer_id, user_id=user.id, status=WAITING,
                stage=stage, enqueued_at=now, last_poll_at=now,
                download_complete=not self._download_required(s, stage),
                device=body.device, vram_gb=body.vram_gb, ram_gb=body.ram_gb, bandwidth_mbps=body.bandwidth_mbps,
                latency_ms=body.latency_ms, announce_ip=target_ip, announce_port=body.announce_port,
                code_version=body.code_version, email=body.email,
            )
            s.add(request)
            s.flush()
            ns.set_state(s, body.peer_id, user.id, stage, ns.QUEUED if request.download_complete else ns.DOWNLOADING, now)
            self._admit(s, now)
            return self._answer(s, request, user, now, session_token, base_url)

    def _check_public_key(self, peer_id: str, public_key: str) -> str:
        try:
            raw = base64.b64decode(public_key, validate=True)
            load_public_key(raw)
        except (binascii.Error, ValueError) as e:
            reason = str(e) if isinstance(e, PeerKeyError) else "not base64"
            raise CoordinatorRefusal(Refusal.BAD_PUBLIC_KEY, reason=reason) from None
        if not hmac.compare_digest(peer_id_of(raw), peer_id):
            raise CoordinatorRefusal(Refusal.KEY_MISMATCH)
        return base64.b64encode(raw).decode("ascii")

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
        if s.scalar(select(QueueRequest).where(QueueRequest.peer_id == peer_id, QueueRequest.status == WAITING)):
            raise CoordinatorRefusal(Refusal.ALREADY_QUEUED)
        if user is not None:
            now = self._clock()
            active = s.scalar(select(func.count()).select_from(ActiveNode).where(
                ActiveNode.user_id == user.id, ActiveNode.expires_at > now, ActiveNode.peer_id != peer_id))
            waiting = s.scalar(select(func.count()).select_from(QueueRequest).where(
                QueueRequest.user_id == user.id, QueueRequest.status == WAITING))
            if active + waiting >= self.config.queue.max_active_per_user:
                raise CoordinatorRefusal(Refusal.TOO_MANY_NODES, count=active + waiting)
        return user

    @staticmethod
    def _create_user(s: Session, username: str, now: float) -> User:
        user = User(username=username, created_at=now)
        s.add(user)
        s.flush()
        return user

    # ---- queue

    def authorization_status(self, token: str | None, body: StatusRequest,
                             base_url: str | None = None) -> AccessAnswer | QueuedAnswer:
        username = self.authenticate(token)
        with self._lock, self.db.session() as s:
            now = self._clock()
            request = s.scalar(select(QueueRequest).where(QueueRequest.request_id == body.request_id))
            if request is None:
                raise CoordinatorRefusal(Refusal.UNKNOWN_REQUEST)
            if not hmac.compare_digest(request.session_token_sha256, _digest(body.session_token)):
                raise CoordinatorRefusal(Refusal.WRONG_SESSION)
            user = s.get(User, request.user_id)
            if user.username != username:
                raise CoordinatorRefusal(Refusal.NOT_YOUR_NODE)
            if request.status == WAITING:
                request.last_poll_at = now
                request.download_bytes = body.download.bytes_done
                request.download_total = body.download.bytes_total
                request.download_complete = request.download_complete or body.download.complete
                ns.set_state(s, request.peer_id, request.user_id, request.stage,
                             ns.QUEUED if request.download_complete else ns.DOWNLOADING, now)
            self._expire(s, now)
            self._admit(s, now)
            try:
                return self._answer(s, request, user, now, None, base_url)
            except CoordinatorRefusal as e:
                refusal = e  # raised after the commit: the drop this poll found must not roll back with it
        raise refusal

    def _expire(self, s: Session, now: float) -> None:
        for node in s.scalars(select(ActiveNode).where(ActiveNode.expires_at <= now)):
            # the moment it ran out, not the moment we noticed: the wait estimate measures departures
            ns.end_node(s, node, ns.EXPIRED, min(now, node.expires_at))
            s.delete(node)
        q = self.config.queue
        for request in s.scalars(select(QueueRequest).where(QueueRequest.status == WAITING)):
            if request.last_poll_at < now - q.abandon_after_s:
                request.status, request.drop_reason = DROPPED, DROPPED_ABANDONED
            elif not request.download_complete and request.enqueued_at < now - q.download_deadline_s:
                request.status, request.drop_reason = DROPPED, DROPPED_SLOW_DOWNLOAD
            else:
                continue
            ns.set_state(s, request.peer_id, request.user_id, request.stage, ns.DROPPED, now)
        s.flush()

    def _admit(self, s: Session, now: float) -> None:
        waiting = self._waiting(s)
        active = s.scalar(select(func.count()).select_from(ActiveNode))
        chosen = set(queue.pick_admissions(
            [queue.Waiting(r.request_id, r.download_complete) for r in waiting],
            queue.free_slots(self.config.queue.capacity, active), self.config.queue.joins_paused))
        for request in waiting:
            if request.request_id not in chosen:
                continue
            request.status, request.admitted_at, request.waited = ADMITTED, now, now > request.enqueued_at
            s.add(ActiveNode(uid=secrets.token_hex(8), peer_id=request.peer_id, user_id=request.user_id,
                             stage=request.stage, granted_at=now, expires_at=now + self.config.access_token_lifetime_s))
            s.get(IdentityBinding, request.peer_id).last_stage = request.stage
            state = ns.set_state(s, request.peer_id, request.user_id, request.stage, ns.STARTING, now)
            state.phase, state.last_heartbeat_at = None, None
        s.flush()

    def _waiting(self, s: Session) -> list[QueueRequest]:
        return list(s.scalars(select(QueueRequest).where(QueueRequest.status == WAITING).order_by(QueueRequest.seq)))

    def _stage_for(self, s: Session, previous: str | None) -> str:
        workers = self._workers_per_stage(s)
        for stage in s.scalars(select(QueueRequest.stage).where(QueueRequest.status == WAITING)):
            workers[stage] = workers.get(stage, 0) + 1
        return assignment.choose_stage(self.config.stage_needs, workers, previous, self.config.stage_hysteresis)

    def _workers_per_stage(self, s: Session) -> dict[str, int]:
        rows = s.execute(select(ActiveNode.stage, func.count()).group_by(ActiveNode.stage))
        return {stage: count for stage, count in rows}

    def _departure_interval(self, s: Session) -> tuple[float | None, int]:
        times = ns.departure_times(s, self.config.queue.wait_estimate_window)
        return queue.departure_interval(times), len(times)

    def _wait_estimate(self, s: Session, position: int) -> float | None:
        interval, _ = self._departure_interval(s)
        return queue.estimated_wait_s(position, interval, self.config.queue.joins_paused)

    def _download_required(self, s: Session, stage: str) -> bool:
        if self.config.checkpoint_url_template is not None:
            return True
        # a coordinator that serves checkpoints has nothing to hand out before a stage's first upload
        return self.config.serves_checkpoints and s.get(StageCheckpoint, stage) is not None

    def _answer(self, s: Session, request: QueueRequest, user: User, now: float,
                session_token: str | None, base_url: str | None) -> AccessAnswer | QueuedAnswer:
        if request.status == DROPPED:
            raise CoordinatorRefusal(Refusal.DOWNLOAD_TOO_SLOW if request.drop_reason == DROPPED_SLOW_DOWNLOAD
                                     else Refusal.ABANDONED)
        if request.status == ADMITTED:
            node = s.scalar(select(ActiveNode).where(ActiveNode.peer_id == request.peer_id))
            if node is None:
                raise CoordinatorRefusal(Refusal.ACCESS_EXPIRED)
            return self._access(s, node, user, base_url)
        position = 1 + [r.seq for r in self._waiting(s)].index(request.seq)
        wait = self._wait_estimate(s, position)
        return QueuedAnswer(
            request_id=request.request_id, session_token=session_token, position=position,
            estimated_wait_seconds=wait, next_poll_seconds=queue.next_poll_s(wait, self.config.queue.poll_interval_s),
            joins_paused=self.config.queue.joins_paused, stage=request.stage,
            download_required=self._download_required(s, request.stage),
            checkpoint_url=self.config.checkpoint_url(request.stage, base_url),
        )

    def _access(self, s: Session, node: ActiveNode, user: User, base_url: str | None = None) -> AccessAnswer:
        public_key = s.get(IdentityBinding, node.peer_id).public_key
        claims = AccessClaims(peer_id=node.peer_id, stage=node.stage, username=user.username, uid=node.uid,
                              issued_at=self._clock(), expires_at=node.expires_at, role=WORKER, public_key=public_key)
        return self._grant(claims, self.config.checkpoint_url(node.stage, base_url), base_url)

    def trainer_access(self, token: str | None, body: TrainerAccessRequest) -> AccessAnswer:
        """Access to call every stage, for an operator's trainer; asked again to renew it. Trainers take
        no place in the queue and report no contribution: they are the run's own machinery."""
        username = self.authenticate(token)
        if username not in self.config.operators:
            raise CoordinatorRefusal(Refusal.NOT_OPERATOR)
        public_key = self._check_public_key(body.peer_id, body.public_key)
        now = self._clock()
        claims = AccessClaims(peer_id=body.peer_id, stage="", username=username, uid=f"trainer-{body.peer_id[-12:]}",
                              issued_at=now, expires_at=now + self.config.access_token_lifetime_s, role=TRAINER,
                              public_key=public_key)
        return self._grant(claims, checkpoint_url=None)

    def _grant(self, claims: AccessClaims, checkpoint_url: str | None, base_url: str | None = None) -> AccessAnswer:
        node = claims.peer_id if claims.role == WORKER else None
        return AccessAnswer(stage=claims.stage, uid=claims.uid, username=claims.username, peer_id=claims.peer_id,
                            access_token=self.signer.issue(claims), expires_at=claims.expires_at,
                            checkpoint_url=checkpoint_url, coordinator_public_key=self.signer.public_key,
                            dashboard_url=self.config.dashboard_url(node, base_url))

    # ---- active nodes

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

    def stop_node(self, token: str | None, body: StopNodeRequest) -> StopNodeAnswer:
        """An operator withdraws a node's access at once; its next heartbeat or refresh is refused with the reason."""
        username = self.authenticate(token)
        if username not in self.config.operators:
            raise CoordinatorRefusal(Refusal.NOT_OPERATOR)
        with self._lock, self.db.session() as s:
            node = s.scalar(select(ActiveNode).where(ActiveNode.peer_id == body.peer_id))
            if node is not None:
                ns.end_node(s, node, ns.STOPPED, self._clock())
                s.delete(node)
            if s.get(IdentityBinding, body.peer_id) is not None:
                s.merge(NodeStop(peer_id=body.peer_id, reason=body.reason, operator=username, at=self._clock()))
            return StopNodeAnswer(peer_id=body.peer_id, was_active=node is not None)

    def refresh(self, token: str | None, body: RefreshRequest, base_url: str | None = None) -> AccessAnswer:
        username = self.authenticate(token)
        with self._lock, self.db.session() as s:
            now = self._clock()
            node, user = self._own_active_node(s, username, body.peer_id, body.uid, now)
            node.expires_at = now + self.config.access_token_lifetime_s
            return self._access(s, node, user, base_url)

    def heartbeat(self, token: str | None, raw_body: bytes, body: HeartbeatRequest, signature_b64: str) -> HeartbeatAnswer:
        username = self.authenticate(token)
        try:
            signature = base64.b64decode(signature_b64, validate=True)
        except (binascii.Error, ValueError):
            raise CoordinatorRefusal(Refusal.BAD_SIGNATURE) from None
        with self._lock, self.db.session() as s:
            now = self._clock()
            binding = s.get(IdentityBinding, body.peer_id)
            if binding is None or not verify_signature(base64.b64decode(binding.public_key), raw_body, signature):
                raise CoordinatorRefusal(Refusal.BAD_SIGNATURE)
            node, user = self._own_active_node(s, username, body.peer_id, body.uid, now)
            if abs(body.sent_at - now) > self.config.max_heartbeat_skew_s:
                raise CoordinatorRefusal(Refusal.CLOCK_SKEW, skew=body.sent_at - now)
            if node.last_sent_at is not None and body.sent_at <= node.last_sent_at:
                raise CoordinatorRefusal(Refusal.STALE_HEARTBEAT)
            self._record_contribution(s, node, body, now)
            if body.leaving:  # its place frees up now, not when its access would have run out
                ns.end_node(s, node, ns.LEFT, now)
                s.delete(node)
                return HeartbeatAnswer(expires_at=now)
            ns.heard_from(s, node, body.phase, now)
            self._expire(s, now)  # a stage counts as empty only once its last node's access has run out
            self._sample_if_due(s, now)
            return self._maybe_move(s, node, user)

    def _record_contribution(self, s: Session, node: ActiveNode, body: HeartbeatRequest, now: float) -> None:
        record = s.scalar(select(Contribution).where(Contribution.peer_id == node.peer_id, Contribution.stage == node.stage))
        if record is None:
            record = Contribution(peer_id=node.peer_id, user_id=node.user_id, stage=node.stage,
                                  samples=0, tokens=0, seconds_online=0.0, updated_at=now)
            s.add(record)
        lifetime = self.config.access_token_lifetime_s
        # a long silence is not time online, nor time to have worked in: cap it at one access lifetime
        elapsed = min(max(0.0, now - (node.last_heartbeat_at or node.granted_at)), lifetime)
        limits = self.config.contributions
        same_session = body.session == node.reporting_session
        samples_before = node.reported_samples if same_session else 0
        tokens_before = node.reported_tokens if same_session else 0
        added_samples = contributions.credit(body.samples_processed, samples_before,
                                             limits.max_samples_per_second * (elapsed + limits.slack_s))
        added_tokens = contributions.credit(body.tokens_processed, tokens_before,
                                            limits.max_tokens_per_second * (elapsed + limits.slack_s))
        record.samples = contributions.saturating_add(record.samples, added_samples)
        record.tokens = contributions.saturating_add(record.tokens, added_tokens)
        if node.last_heartbeat_at is not None:
            record.seconds_online += elapsed
        record.updated_at = now
        # what was reported, not what was credited: work over the bound is forfeited, not owed later
        node.reported_samples = max(samples_before, body.samples_processed)
        node.reported_tokens = max(tokens_before, body.tokens_processed)
        node.reporting_session = body.session
        node.last_heartbeat_at, node.last_sent_at = now, body.sent_at

    def _maybe_move(self, s: Session, node: ActiveNode, user: User) -> HeartbeatAnswer:
        nodes = [assignment.NodeOnStage(n.uid, n.stage, n.granted_at) for n in s.scalars(select(ActiveNode))]
        move = assignment.choose_move(self.config.stage_needs, nodes)
        if move is None or move.uid != node.uid:
            return HeartbeatAnswer(expires_at=node.expires_at)
        node.stage = move.to_stage
        # counters restart on the new stage, so the next heartbeat's totals are all new work there
        node.reported_samples = node.reported_tokens = 0
        s.get(IdentityBinding, node.peer_id).last_stage = move.to_stage
        return HeartbeatAnswer(expires_at=node.expires_at, move_to_stage=move.to_stage,
                               access_token=self._access(s, node, user).access_token)

    # ---- checkpoints

    def authorize_upload(self, access_token: str | None, stage: str) -> Uploader:
        """Who may replace ``stage``'s checkpoint: a node holding unexpired access to that very stage."""
        if stage not in self.config.stage_needs:
            raise CoordinatorRefusal(Refusal.UNKNOWN_STAGE, stage=stage)
        if not access_token:
            raise CoordinatorRefusal(Refusal.NO_ACCESS_TOKEN)
        try:
            claims = verify_access_token(access_token, self.signer.public_key, now=self._clock())
        except AccessTokenError as e:
            raise CoordinatorRefusal(Refusal.BAD_ACCESS_TOKEN, reason=str(e)) from None
        if claims.stage != stage:
            raise CoordinatorRefusal(Refusal.WRONG_STAGE, token_stage=claims.stage, stage=stage)
        # the signature alone outlives a move to another stage or a lapse; the database knows better
        with self._lock, self.db.session() as s:
            node = s.get(ActiveNode, claims.uid)
            if node is None or node.peer_id != claims.peer_id or node.stage != stage or node.expires_at <= self._clock():
                raise CoordinatorRefusal(Refusal.ACCESS_WITHDRAWN, stage=stage)
        return Uploader(username=claims.username, peer_id=claims.peer_id)

    def authorize_download(self, token: str | None, stage: str) -> None:
        """Who may download ``stage``'s checkpoint (the stage's weights and optimizer state, and the
        uploader's counters that ride along in it): a node holding access to that stage (its access
        token), an account with a node queued for or serving that stage (its participant token, the
        download a queued node makes while it waits), or an operator. Nobody else, strangers least."""
        if stage not in self.config.stage_needs:
            raise CoordinatorRefusal(Refusal.UNKNOWN_STAGE, stage=stage)
        if not token:
            raise CoordinatorRefusal(Refusal.DOWNLOAD_NEEDS_TOKEN)
        if token.startswith(f"{ACCESS_TOKEN_PREFIX}."):  # never sent on to Hugging Face
            self.authorize_upload(token, stage)
            return
        username = self.authenticate(token)
        if username in self.config.operators:
            return
        with self._lock, self.db.session() as s:
            user = s.scalar(select(User).where(User.username == username))
            if user is None:
                raise CoordinatorRefusal(Refusal.NOT_ON_STAGE, stage=stage)
            now = self._clock()
            serving = s.scalar(select(ActiveNode.uid).where(ActiveNode.user_id == user.id, ActiveNode.stage == stage,
                                                             ActiveNode.expires_at > now).limit(1))
            waiting = s.scalar(select(QueueRequest.seq).where(QueueRequest.user_id == user.id, QueueRequest.stage == stage,
                                                              QueueRequest.status == WAITING).limit(1))
            if serving is None and waiting is None:
                raise CoordinatorRefusal(Refusal.NOT_ON_STAGE, stage=stage)

    # ---- public read-only views

    def run_info(self) -> RunInfo:
        with self._lock, self.db.session() as s:
            now = self._clock()
            self._refresh_states(s, now)
            counts = history.stage_counts(s, [st.name for st in self.config.stages])
            workers = self._workers_per_stage(s)
            waiting = len(self._waiting(s))
            return RunInfo(
                run_name=self.config.run_name,
                stages=[self._stage_info(st.name, st.need, counts[st.name]) for st in self.config.stages],
                capacity=self.config.queue.capacity, active_nodes=sum(workers.values()), queue_length=waiting,
                estimated_wait_seconds=self._newcomer_wait(s, waiting, sum(workers.values())),
                wait_estimate_basis=self._wait_basis(s, waiting, sum(workers.values())),
                joins_paused=self.config.queue.joins_paused, coordinator_public_key=self.signer.public_key,
            )

    @staticmethod
    def _stage_info(name: str, need: int, count) -> StageInfo:
        serving = sum(count[state] for state in ns.SERVING_STATES)
        return StageInfo(name=name, need=need, workers=serving + count[ns.LAPSED], serving=serving,
                         training=count[ns.TRAINING], warming_up=count[ns.WARMING_UP], lapsed=count[ns.LAPSED],
                         queued=count["queued"])

    def _wait_basis(self, s: Session, waiting: int, active: int) -> str:
        if self.config.queue.joins_paused:
            return "joins are paused"
        if not waiting and queue.free_slots(self.config.queue.capacity, active):
            return "the run has free places"
        interval, seen = self._departure_interval(s)
        if interval is None:
            return "not known yet: the run is full and fewer than two nodes have left it so far"
        return f"a place freed up every {interval:.0f}s on average over the last {seen} departures"

    def _refresh_states(self, s: Session, now: float) -> None:
        """Expiries, admissions and lapses as of now, and a sample for the charts if one is due."""
        self._expire(s, now)
        self._admit(s, now)
        ns.mark_lapsed(s, self.config.dashboard.lapse_after_s, now)
        self._sample_if_due(s, now)

    def _sample_if_due(self, s: Session, now: float) -> None:
        if now - self._last_sample < self.config.dashboard.sample_interval_s:
            return
        s.flush()
        history.take_sample(s, self.config, now)
        self._last_sample = now

    def sample(self) -> None:
        """Called periodically, so the charts go on while nobody calls (nodes gone silent lapse then too)."""
        with self._lock, self.db.session() as s:
            self._refresh_states(s, self._clock())

    def training_report(self, token: str | None, body: TrainingReport) -> None:
        """A trainer's progress for the charts; like trainer access, operators only."""
        username = self.authenticate(token)
        if username not in self.config.operators:
            raise CoordinatorRefusal(Refusal.NOT_OPERATOR)
        with self._lock, self.db.session() as s:
            history.record_training(s, body, self._clock())

    def history(self, since: float = 0.0) -> HistoryAnswer:
        with self._lock, self.db.session() as s:
            now = self._clock()
            self._refresh_states(s, now)
            return history.history(s, self.config, since, now)

    def nodes(self, peer_id: str | None = None) -> list[NodeInfo]:
        with self._lock, self.db.session() as s:
            self._refresh_states(s, self._clock())
            return history.nodes(s, self.config, peer_id)

    def _newcomer_wait(self, s: Session, waiting: int, active: int) -> float | None:
        if not waiting and not self.config.queue.joins_paused and queue.free_slots(self.config.queue.capacity, active):
            return 0.0
        return self._wait_estimate(s, waiting + 1)

    def totals(self) -> RunTotals:
        with self.db.session() as s:
            admissions = s.execute(select(QueueRequest.stage, func.count()).where(QueueRequest.status == ADMITTED)
                                   .group_by(QueueRequest.stage))
            drops = s.execute(select(QueueRequest.drop_reason, func.count()).where(QueueRequest.status == DROPPED)
                              .group_by(QueueRequest.drop_reason))
            samples, tokens = collections.defaultdict(list), collections.defaultdict(list)
            for stage, stage_samples, stage_tokens in s.execute(select(Contribution.stage, Contribution.samples, Contribution.tokens)):
                samples[stage].append(stage_samples)
                tokens[stage].append(stage_tokens)
            return RunTotals(admissions=dict(admissions.all()), queue_drops=dict(drops.all()),
                             samples={stage: contributions.total(values) for stage, values in samples.items()},
                             tokens={stage: contributions.total(values) for stage, values in tokens.items()})

    def contributions(self) -> list[ContributionInfo]:
        with self.db.session() as s:
            rows = s.execute(select(Contribution, User.username).join(User, Contribution.user_id == User.id)
                             .order_by(Contribution.id))
            return [ContributionInfo(username=name, peer_id=c.peer_id, stage=c.stage, samples=int(c.samples),
                                     tokens=int(c.tokens), seconds_online=c.seconds_online) for c, name in rows]
