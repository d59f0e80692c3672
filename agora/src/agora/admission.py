"""A peer's side of the coordinator: join → queue → access, then heartbeats and token refreshes
(workers); access for an operator's trainer (``trainer_access``), renewed by the same session.

``admit`` runs before the worker's p2p daemon takes its port: the port-test listener answers the
coordinator's connect-back on that port while the join is in flight. ``CoordinatorSession`` runs
beside the worker: it reports the worker's counters in signed heartbeats, refreshes the access token
before it expires (retrying with backoff while the coordinator is unreachable) and, when the
coordinator refuses the node or its access runs out, emits ``CoordinatorStop`` so that the health
rules stop the worker with a message.
"""

from __future__ import annotations

import base64
import collections
import json
import math
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from agora.checkpoint_download import CheckpointDownloadError, download_checkpoint
from agora.code_version import code_version
from agora_server.peer_keys import WorkerIdentity
from agora.coordinator.porttest import PortTestListener
from agora.coordinator.schemas import AccessAnswer as Access
from agora_server.access import PeerAccess
from agora_server.telemetry import events as ev
from agora_server.telemetry.contribution import contribution, heartbeat_counters

if TYPE_CHECKING:
    from agora.config import RunConfig
    from agora_server.dht_access import AccessRecordValidator

AUTH_TIMEOUT_MESSAGE = "Authorization timeout after {seconds:.0f}s"
_CALL_TIMEOUT = 30.0  # seconds a call to the coordinator may take
_EXPIRY_SLACK = 0.05


class AdmissionError(RuntimeError):
    """The coordinator refused this node, or could not be reached; the message says which (never the token)."""


class CoordinatorUnavailable(AdmissionError):
    """The coordinator did not answer (network, 5xx): worth another try."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message
        """What went wrong, without the address (e.g. ``ConnectError: [Errno 111] Connection refused``)."""


class CoordinatorClient:
    """PUT calls with the participant's token; refusals become AdmissionError with the coordinator's message."""

    def __init__(self, base_url: str, token: str, timeout: float = 30.0):
        self._http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout, headers={"Authorization": f"Bearer {token}"})
        self._token, self._timeout = token, timeout

    def separate(self) -> "CoordinatorClient":
        """A client of the same coordinator and account with connections of its own: a transfer that
        takes minutes on it never delays a call on this one."""
        return CoordinatorClient(self.base_url, self._token, self._timeout)

    def auth_for(self, url: str) -> dict[str, str]:
        """The participant's token for a download from ``url``: only when this coordinator serves it
        (it serves a stage's checkpoint only to that stage's nodes), never to weights hosted elsewhere."""
        return {"Authorization": self._http.headers["Authorization"]} if url.startswith(self.base_url + "/") else {}

    def put(self, path: str, body: dict | None = None, *, content: bytes | None = None, headers: dict | None = None,
            timeout: float | None = None) -> dict:
        wait = httpx.USE_CLIENT_DEFAULT if timeout is None else timeout
        try:
            answer = self._http.put(path, json=body if content is None else None, content=content, headers=headers, timeout=wait)
        except httpx.HTTPError as e:
            reason = f"{type(e).__name__}: {e}"[:300] if str(e) else type(e).__name__
            raise CoordinatorUnavailable(f"the coordinator at {self._http.base_url} did not answer: {reason}", reason) from None
        if answer.status_code >= 500:
            reason = f"it answered {answer.status_code}: {_detail(answer)}"
            raise CoordinatorUnavailable(f"the coordinator {reason}", reason)
        if answer.status_code >= 400:
            raise AdmissionError(_detail(answer))
        return answer.json() if answer.content else {}

    @property
    def base_url(self) -> str:
        return str(self._http.base_url).rstrip("/")

    def close(self) -> None:
        self._http.close()


def _detail(answer: httpx.Response) -> str:
    try:
        detail = answer.json().get("detail")
    except ValueError:
        detail = None
    return detail if isinstance(detail, str) else f"HTTP {answer.status_code}"


def admit(
    client: CoordinatorClient,
    identity: WorkerIdentity,
    *,
    host: str,
    port: int,
    emit: Callable[[ev.Event], None],
    timeout: float,
    email: str | None = None,
    weights_for: Callable[[str], Path | None] = lambda stage: None,
    stop: threading.Event | None = None,
) -> tuple[Access, Path | None]:
    """Join, wait in the queue if told to (downloading the stage's weights meanwhile), and return the
    access and the downloaded weights; AdmissionError if refused or timed out.

    ``weights_for(stage)`` says where to put that stage's weights, or None if this node already has
    its own state for it (then nothing is downloaded)."""
    request = {
        **_key_request(identity),
        "announce_port": port,
        "code_version": code_version(),
        "email": email,
    }
    stop = stop or threading.Event()
    emit(ev.JoiningRun(coordinator=client.base_url))
    with PortTestListener(host, port):  # closed before the p2p daemon binds the same port
        answer = _unless_stopped(stop, lambda: client.put("/api/join", request))
    deadline = time.monotonic() + timeout
    ticket = {"request_id": answer.get("request_id"), "session_token": answer.get("session_token")}
    weights: Path | None = None
    progress = {"complete": True}  # nothing to download unless the coordinator says so
    while answer["status"] == "queued":
        emit(ev.AuthQueued(position=answer["position"], estimated_wait_seconds=answer["estimated_wait_seconds"],
                           joins_paused=bool(answer.get("joins_paused"))))
        fetched_now = False
        if answer.get("download_required") and answer.get("checkpoint_url") and weights is None:
            dest = weights_for(answer["stage"])
            if dest is not None:
                url = answer["checkpoint_url"]
                weights, progress = _fetch_weights(url, dest, emit, client.auth_for(url))
                fetched_now = progress["complete"]
        # a node held back only by its download may be admitted the moment it has the weights: ask at once
        pause = 0.0 if fetched_now else float(answer["next_poll_seconds"])
        if time.monotonic() + pause > deadline:
            raise AdmissionError(AUTH_TIMEOUT_MESSAGE.format(seconds=timeout))
        if stop.wait(pause):  # the coordinator says when to ask again
            raise AdmissionError("stopped while waiting in the authorization queue")
        answer = _unless_stopped(stop, lambda: client.put("/api/authorization_status", {**ticket, "download": progress}))
    access = Access.model_validate(answer)
    emit(ev.AccessGranted(username=access.username, stage=access.stage, expires_at=access.expires_at,
                          dashboard_url=access.dashboard_url))
    return access, weights


def _unless_stopped(stop: threading.Event, call: Callable[[], dict]) -> dict:
    """``call()``, unless ``stop`` is set first: a coordinator that accepts the connection and never
    answers must not hold a stopping node for the whole call timeout."""
    result: dict = {}

    def run() -> None:
        try:
            result["answer"] = call()
        except BaseException as e:  # handed to the waiting thread, raised there
            result["error"] = e

    thread = threading.Thread(target=run, name="coordinator-call", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
        if stop.is_set() and thread.is_alive():
            raise AdmissionError("stopped while waiting for the coordinator")
    if "error" in result:
        raise result["error"]
    return result["answer"]


def trainer_access(client: CoordinatorClient, identity: WorkerIdentity, timeout: float | None = None) -> Access:
    """Access to call every stage, for a trainer run by one of the run's operators."""
    return Access.model_validate(client.put("/api/trainer_access", _key_request(identity), timeout=timeout))


def access_for(config: RunConfig, access: Access, identity: WorkerIdentity) -> tuple[PeerAccess, AccessRecordValidator]:
    """This peer's PeerAccess and the DHT validator that signs its records and checks everyone's."""
    peer_access = PeerAccess(access.access_token, access.coordinator_public_key, identity)
    return peer_access, run_record_validator(config, access.coordinator_public_key, identity=identity, token=access.access_token)


def run_record_validator(config: RunConfig, coordinator_public_key: str, **signer) -> AccessRecordValidator:
    """The run's DHT validator; ``signer`` (identity, token) for a peer that writes records of its own."""
    from agora_server.dht_access import AccessRecordValidator  # imports hivemind

    stages = [s.name for s in config.stages]
    return AccessRecordValidator.for_run(config.run_name, stages, config.server.averaging, coordinator_public_key, **signer)


def _expired_reason(expires_at: float, last_answer: float, error: Exception) -> str:
    return (f"the access token expired at {_utc(expires_at)}; the coordinator has not answered since {_utc(last_answer)}"
            f" (last error: {error}). Check that the coordinator is running and reachable from this machine, then start this node again.")


def _utc(t: float) -> str:
    return time.strftime("%H:%M:%S UTC", time.gmtime(t))


def _key_request(identity: WorkerIdentity) -> dict:
    return {"peer_id": identity.peer_id, "public_key": base64.b64encode(identity.public_key_protobuf).decode()}


def _fetch_weights(url: str, dest: Path, emit: Callable[[ev.Event], None], headers: dict[str, str]) -> tuple[Path | None, dict]:
    """Download while queued; a failure leaves the partial file for the next poll to resume."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    emit(ev.DownloadProgress(bytes_done=0, bytes_total=None))
    reported, started, first = [0.0], time.monotonic(), [None]

    def on_progress(done: int, total: int | None) -> None:
        now = time.monotonic()
        first[0] = done if first[0] is None else first[0]  # a resumed download's rate counts from there
        if now - reported[0] >= 5.0:  # a line every few seconds, not per chunk
            reported[0] = now
            rate = (done - first[0]) / (now - started) if now > started and done > first[0] else None
            emit(ev.DownloadProgress(bytes_done=done, bytes_total=total, bytes_per_second=rate))

    try:
        result = download_checkpoint(url, dest, on_progress=on_progress, headers=headers)
    except CheckpointDownloadError as e:
        emit(ev.CoordinatorUnreachable(action="download the stage's weights", error=str(e), retry_in=0))
        done = dest.with_name(dest.name + ".part")
        return None, {"complete": False, "bytes_done": done.stat().st_size if done.exists() else 0}
    emit(ev.DownloadComplete(path=str(result.path), size=result.size, resumed_from=result.resumed_from))
    return result.path, {"complete": True, "bytes_done": result.size, "bytes_total": result.size}


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
        access: Access,
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
        self._reports: collections.deque[dict] = collections.deque(maxlen=1000)  # a trainer's, not yet sent
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
            self._reports.append(_training_report(self.access.peer_id, event))
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
            self._set_access(trainer_access(self.client, self.identity, timeout=self._call_timeout()))
        else:
            answer = self.client.put("/api/refresh_token", {"peer_id": self.access.peer_id, "uid": self.access.uid}, timeout=self._call_timeout())
            self._set_access(Access.model_validate(answer))

    def _set_access(self, access: Access) -> None:
        self.access = access
        self._lifetime = max(0.0, access.expires_at - self.clock())
        self._answered_at = self.clock()
        if self.peer_access is not None:
            self.peer_access.renew(access.access_token)

    def _send_reports(self, timeout: float | None = None) -> None:
        while self._reports:
            try:
                self.client.put("/api/training_report", self._reports[0], timeout=timeout or self._call_timeout())
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
        body = json.dumps(
            {
                "peer_id": self.access.peer_id,
                "uid": self.access.uid,
                "sent_at": sent_at,
                "session": self._session_id,
                "samples_processed": done.samples,
                "tokens_processed": done.tokens,
                "phase": self._phase,
                "leaving": leaving,
            }
        ).encode()
        signature = base64.b64encode(self.identity.sign(body)).decode()
        answer = self.client.put("/api/heartbeat", content=body, headers={"Content-Type": "application/json", "X-Agora-Signature": signature},
                                 timeout=timeout or self._call_timeout())
        self._last_sent_at = sent_at
        self.heartbeats += 1
        if leaving:
            return
        move = answer.get("move_to_stage")
        if move and move != self.access.stage:
            # its records, calls and rounds would all be refused on the old stage from now on; a restart
            # joins again and is assigned the new stage (the coordinator has recorded the move)
            raise AdmissionError(f"The coordinator moved this node to stage {move}, which has no workers; start it again to serve there.")
        if answer.get("access_token"):
            self._set_access(self.access.model_copy(update={"access_token": answer["access_token"], "expires_at": answer["expires_at"]}))
        elif answer.get("expires_at"):
            self.access = self.access.model_copy(update={"expires_at": answer["expires_at"]})


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _training_report(peer_id: str, event: ev.Event) -> dict:
    """The body of ``/api/training_report`` for one of the trainer's events."""
    if isinstance(event, ev.ValidationMeasured):
        return {"peer_id": peer_id, "step": event.step, "validation_loss": _finite(event.loss)}
    if isinstance(event, ev.TrainerFinished):
        return {"peer_id": peer_id, "step": event.completed, "loss": _finite(event.final_loss),
                "dropped": sum(event.dropped.values()), "finished": True}
    loss = event.smoothed_loss if event.smoothed_loss is not None else event.loss
    return {"peer_id": peer_id, "step": event.step, "total_steps": event.total_steps, "loss": _finite(loss),
            "tokens_per_second": _finite(event.tokens_per_second), "stages_served": event.stages_served,
            "stages_total": event.stages_total, "workers": event.workers, "dropped": event.dropped}
