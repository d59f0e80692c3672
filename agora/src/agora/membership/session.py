"""An admitted peer's session with the coordinator, on a thread of its own: a worker's signed
heartbeats (its counters), a trainer's progress reports (the dashboard's charts), and the renewal of
the access before it expires, retried with backoff while the coordinator is unreachable. When the
coordinator refuses the node or its access runs out, the session emits ``CoordinatorStop`` so that
the health rules stop the peer with a message.
"""

from __future__ import annotations

import collections
import math
import secrets
import threading
import time
from collections.abc import Callable

from agora.membership.client import (
    AdmissionError,
    CoordinatorClient,
    CoordinatorUnavailable,
    build_request,
    peer_key,
)
from agora.protocol import AccessAnswer, HeartbeatRequest, RefreshRequest, TrainerAccessRequest, TrainingReport
from agora_server.access import PeerAccess
from agora_server.peer_keys import WorkerIdentity
from agora_server.telemetry import events as ev
from agora_server.telemetry.contribution import contribution, heartbeat_counters

_CALL_TIMEOUT = 30.0  # seconds a call to the coordinator may take
_EXPIRY_SLACK = 0.05


class CoordinatorSession:
    """Heartbeats and token refreshes for an admitted worker, on a thread of their own; for a trainer
    (``trainer=True``) the renewals and its progress reports (the dashboard's charts). Every renewed
    token goes to ``peer_access``, from which the peer's records, calls and averaging rounds take it.
    A worker that stops says so in a last heartbeat, so its place frees up at once.

    The access is renewed ``refresh_margin`` seconds before it expires, or a third of its lifetime
    before if that is less: a short-lived token (a test's) is then renewed once per lifetime like a
    production one, not on every wake-up. While the coordinator does not answer, tries are spaced by a
    doubling backoff (2 s up to ``max_backoff``), never past the expiry: the worker has to stop then,
    since its peers refuse an expired token, and the last try is made at that moment. Checkpoint
    uploads go elsewhere (``checkpoint_upload``), so none of this ever waits for one."""

    def __init__(
        self,
        client: CoordinatorClient,
        identity: WorkerIdentity,
        access: AccessAnswer,
        emit: Callable[[ev.Event], None],
        *,
        heartbeat_interval: float = 30.0,
        refresh_margin: float = 300.0,
        max_backoff: float = 60.0,
        clock: Callable[[], float] = time.time,
        peer_access: PeerAccess | None = None,
        trainer: bool = False,
    ):
        self.client, self.identity, self.access, self.emit = client, identity, access, emit
        self.peer_access, self.trainer = peer_access, trainer
        self.heartbeat_interval, self.refresh_margin, self.max_backoff, self.clock = heartbeat_interval, refresh_margin, max_backoff, clock
        self._lifetime = max(0.0, access.expires_at - clock())
        self._answered_at = clock()  # it has just admitted this node
        self._stats: ev.WorkerStats | None = None
        self._baseline: dict[str, float] = {}  # counters when this access began: heartbeats report what came after
        self._last_sent_at = 0.0
        # a restarted process reports totals from zero again; the coordinator tells it by this id
        self._session_id = secrets.token_hex(8)
        self._phase = "training"
        self._reports: collections.deque[TrainingReport] = collections.deque(maxlen=1000)  # a trainer's, not yet sent
        self._ended = False  # refused or expired: nothing more to tell the coordinator
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="coordinator-session", daemon=True)
        self.heartbeats = 0

    def __call__(self, event: ev.Event) -> None:
        if isinstance(event, ev.WorkerStats):
            self._stats = event
        elif isinstance(event, ev.WarmupStarted):
            self._phase = "warming_up"
        elif isinstance(event, ev.WarmupComplete):
            self._phase = "training"
        elif self.trainer and isinstance(event, (ev.TrainerReport, ev.ValidationMeasured, ev.TrainerFinished)):
            try:
                self._reports.append(_training_report(self.access.peer_id, event))
            except AdmissionError:
                return  # out of the protocol's bounds (a diverged loss): the coordinator would refuse it too
            self._wake.set()

    def start(self, counters_at_access: ev.WorkerStats | None) -> None:
        """Begin reporting; ``counters_at_access`` is the worker's state before it served anything
        under this access (heartbeats report the work done since); None for a trainer."""
        self._stats = counters_at_access
        self._baseline = heartbeat_counters(counters_at_access) if counters_at_access else {}
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        started = self._thread.ident is not None
        if self._thread.is_alive():  # not started if the worker failed to build
            self._thread.join(15)
        if started and not self._ended:
            try:  # one quick try each: a stopping peer must not hang on an unreachable coordinator
                if self.trainer:
                    self._send_reports(timeout=5.0)
                else:
                    self._heartbeat(leaving=True, timeout=5.0)
            except AdmissionError:
                pass
        self.client.close()

    def _loop(self) -> None:
        backoff = 0.0  # while the coordinator does not answer: the pause before the next try
        while True:
            self._wake.wait(self._next_wait(backoff))
            self._wake.clear()
            if self._stop.is_set():
                return
            action = "report progress"
            try:
                if self.access.expires_at - self.clock() < self._refresh_margin():
                    action = "renew the access token"
                    self._refresh()
                    action = "report progress"
                self._heartbeat()
                self._send_reports()
                backoff, self._answered_at = 0.0, self.clock()
            except CoordinatorUnavailable as e:
                left = self.access.expires_at - self.clock()
                if left <= 0:
                    self._ended = True
                    self.emit(ev.CoordinatorStop(reason=_expired_reason(self.access.expires_at, self._answered_at, e), access_expired=True))
                    return
                backoff = min(self.max_backoff, 2 * backoff if backoff else 2.0)
                self.emit(ev.CoordinatorUnreachable(action=action, error=str(e), retry_in=min(backoff, left), expires_in=left))
            except AdmissionError as e:
                self._ended = True
                self.emit(ev.CoordinatorStop(reason=str(e)))
                return

    def _refresh_margin(self) -> float:
        return min(self.refresh_margin, self._lifetime / 3)

    def _next_wait(self, backoff: float) -> float:
        left = self.access.expires_at - self.clock()
        if backoff:
            # a hair past the expiry, not before it: the Event's timer and the wall clock differ by
            # milliseconds, and waking just short of it would cost one more retry line
            return max(0.0, min(backoff, left + _EXPIRY_SLACK))
        return max(0.5, min(self.heartbeat_interval, left - self._refresh_margin()))

    def _call_timeout(self) -> float:
        # an unreachable host that drops packets would hold a call for the client's whole timeout:
        # cap it so that the worker still stops when its access expires
        return max(1.0, min(_CALL_TIMEOUT, self.access.expires_at - self.clock()))

    def _refresh(self) -> None:
        if self.trainer:
            request = build_request(TrainerAccessRequest, **peer_key(self.identity))
            renewed = self.client.trainer_access(request, timeout=self._call_timeout())
            if (renewed.data_shard, renewed.data_shards) != (self.access.data_shard, self.access.data_shards):
                # the data it streams is another shard's now (the run's shards changed): its position is wrong
                raise AdmissionError(f"The coordinator now gives this trainer data shard {renewed.data_shard} of {renewed.data_shards} "
                                     f"instead of {self.access.data_shard} of {self.access.data_shards}; start it again to read that shard.")
            self._set_access(renewed)
        else:
            request = build_request(RefreshRequest, peer_id=self.access.peer_id, uid=self.access.uid)
            self._set_access(self.client.refresh(request, timeout=self._call_timeout()))

    def _set_access(self, access: AccessAnswer) -> None:
        self.access = access
        self._lifetime = max(0.0, access.expires_at - self.clock())
        self._answered_at = self.clock()
        if self.peer_access is not None:
            self.peer_access.renew(access.access_token)

    def _send_reports(self, timeout: float | None = None) -> None:
        while self._reports:
            try:
                self.client.training_report(self._reports[0], timeout=timeout or self._call_timeout())
            except CoordinatorUnavailable:
                raise  # kept: sent with the next try
            except AdmissionError:
                pass  # refused (e.g. not an operator any more): the charts miss it, training goes on
            self._reports.popleft()

    def _heartbeat(self, leaving: bool = False, timeout: float | None = None) -> None:
        stats = self._stats
        if stats is None:
            return
        counters = heartbeat_counters(stats)
        done = contribution({key: counters[key] - self._baseline.get(key, 0) for key in counters})
        sent_at = max(self.clock(), self._last_sent_at + 1e-3)
        request = build_request(HeartbeatRequest, peer_id=self.access.peer_id, uid=self.access.uid, sent_at=sent_at,
                                session=self._session_id, samples_processed=done.samples, tokens_processed=done.tokens,
                                phase=self._phase, leaving=leaving)
        answer = self.client.heartbeat(request, self.identity, timeout=timeout or self._call_timeout())
        self._last_sent_at = sent_at
        self.heartbeats += 1
        if leaving:
            return
        move = answer.move_to_stage
        if move and move != self.access.stage:
            # its records, calls and rounds would all be refused on the old stage from now on; a restart
            # joins again and is assigned the new stage (the coordinator has recorded the move)
            raise AdmissionError(f"The coordinator moved this node to stage {move}, which has no workers; start it again to serve there.")
        if answer.access_token:
            self._set_access(self.access.model_copy(update={"access_token": answer.access_token, "expires_at": answer.expires_at}))
        else:
            self.access = self.access.model_copy(update={"expires_at": answer.expires_at})


def _expired_reason(expires_at: float, last_answer: float, error: Exception) -> str:
    return (f"the access token expired at {_utc(expires_at)}; the coordinator has not answered since {_utc(last_answer)}"
            f" (last error: {error}). Check that the coordinator is running and reachable from this machine, then start this node again.")


def _utc(t: float) -> str:
    return time.strftime("%H:%M:%S UTC", time.gmtime(t))


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _training_report(peer_id: str, event: ev.Event) -> TrainingReport:
    """The ``/api/training_report`` for one of the trainer's events."""
    if isinstance(event, ev.ValidationMeasured):
        return build_request(TrainingReport, peer_id=peer_id, step=event.step, validation_loss=_finite(event.loss))
    if isinstance(event, ev.TrainerFinished):
        return build_request(TrainingReport, peer_id=peer_id, step=event.completed, loss=_finite(event.final_loss),
                             dropped=sum(event.dropped.values()), finished=True)
    loss = event.smoothed_loss if event.smoothed_loss is not None else event.loss
    return build_request(TrainingReport, peer_id=peer_id, step=event.step, total_steps=event.total_steps, loss=_finite(loss),
                         tokens_per_second=_finite(event.tokens_per_second), stages_served=event.stages_served,
                         stages_total=event.stages_total, workers=event.workers, dropped=event.dropped)
