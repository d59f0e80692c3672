"""How a peer joins a run: ``join(role, …)`` gets its access from the coordinator and returns its
``Membership``: the session that keeps the access renewed and the DHT validator that signs with it.

A worker (``WorkerRole``) joins before its p2p daemon takes its port: the port-test listener answers
the coordinator's connect-back on that port while the join is in flight. It may then wait in the
queue, downloading its stage's weights meanwhile. A trainer (``TrainerRole``) run by one of the
run's operators gets access to call every stage at once.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from agora.membership.access import access_for
from agora.membership.checkpoint_download import CheckpointDownloadError, download_checkpoint
from agora.membership.client import AdmissionError, CoordinatorClient, build_request, peer_key
from agora.membership.code_version import code_version
from agora.membership.identity import ensure_identity
from agora.membership.port_test import PortTestListener
from agora.membership.session import CoordinatorSession
from agora.protocol import AccessAnswer, DownloadProgress, JoinRequest, QueuedAnswer, StatusRequest, TrainerAccessRequest
from agora_server.peer_keys import WorkerIdentity
from agora_server.telemetry import events as ev

if TYPE_CHECKING:
    from agora.config import RunConfig
    from agora_server.dht_access import AccessRecordValidator

AUTH_TIMEOUT_MESSAGE = "Authorization timeout after {seconds:.0f}s"
Answer = TypeVar("Answer")


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Role:
    heartbeat_interval: float = 30.0
    """Seconds between the session's calls to the coordinator (a worker's heartbeats, a trainer's reports)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainerRole(_Role):
    """A trainer run by one of the run's operators: access to call every stage, without a queue."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class WorkerRole(_Role):
    """A stage worker: its port tested, queued until the coordinator admits it to a stage."""

    host: str
    port: int
    """Where the coordinator's port test connects: the address the worker's p2p daemon will listen on."""
    wait_timeout: float
    """Seconds it may wait in the queue before it gives up ("Authorization timeout")."""
    email: str | None = None


@dataclasses.dataclass(frozen=True)
class Membership:
    session: CoordinatorSession
    """Holds the access and renews it; started by the peer once it serves."""
    validator: AccessRecordValidator
    weights: Path | None = None
    """The stage's weights downloaded while queued; None if this identity has its own checkpoint (or for a trainer)."""


def join(
    role: WorkerRole | TrainerRole,
    config: RunConfig,
    *,
    coordinator_url: str,
    token: str,
    identity_path: str | Path,
    emit: Callable[[ev.Event], None],
    stop: threading.Event | None = None,
) -> Membership:
    """Access for this peer's identity (created if missing) in ``role``; AdmissionError if refused or
    timed out (CoordinatorUnavailable if the coordinator did not answer)."""
    identity = WorkerIdentity.load(ensure_identity(identity_path))
    client = CoordinatorClient(coordinator_url, token)
    try:
        if isinstance(role, WorkerRole):
            access, weights = admit(client, identity, role, emit, weights_for=_weights_for(config, identity), stop=stop)
        else:
            access, weights = client.trainer_access(build_request(TrainerAccessRequest, **peer_key(identity))), None
    except AdmissionError:
        client.close()
        raise
    peer_access, validator = access_for(config, access, identity)
    session = CoordinatorSession(client, identity, access, emit, heartbeat_interval=role.heartbeat_interval, peer_access=peer_access,
                                 trainer=isinstance(role, TrainerRole))
    return Membership(session, validator, weights)


def _weights_for(config: RunConfig, identity: WorkerIdentity) -> Callable[[str], Path | None]:
    from agora_server.server.checkpoint import checkpoint_path  # imports torch

    def weights_for(stage: str) -> Path | None:
        own = checkpoint_path(config.server.checkpoint_dir, config.run_name, stage, identity.peer_id)
        return None if own.exists() else own.with_name("from-coordinator.pt")

    return weights_for


def admit(
    client: CoordinatorClient,
    identity: WorkerIdentity,
    role: WorkerRole,
    emit: Callable[[ev.Event], None],
    *,
    weights_for: Callable[[str], Path | None] = lambda stage: None,
    stop: threading.Event | None = None,
) -> tuple[AccessAnswer, Path | None]:
    """Join, wait in the queue if told to (downloading the stage's weights meanwhile), and return the
    access and the downloaded weights; AdmissionError if refused or timed out.

    ``weights_for(stage)`` says where to put that stage's weights, or None if this node already has
    its own state for it (then nothing is downloaded)."""
    request = build_request(JoinRequest, **peer_key(identity), announce_port=role.port, code_version=code_version(), email=role.email)
    stop = stop or threading.Event()
    emit(ev.JoiningRun(coordinator=client.base_url))
    with PortTestListener(role.host, role.port):  # closed before the p2p daemon binds the same port
        answer = _unless_stopped(stop, lambda: client.join(request))
    deadline = time.monotonic() + role.wait_timeout
    ticket: StatusRequest | None = None
    weights: Path | None = None
    progress = DownloadProgress(complete=True)  # nothing to download unless the coordinator says so
    while isinstance(answer, QueuedAnswer):
        ticket = ticket or build_request(StatusRequest, request_id=answer.request_id, session_token=answer.session_token)
        emit(ev.AuthQueued(position=answer.position, estimated_wait_seconds=answer.estimated_wait_seconds,
                           joins_paused=answer.joins_paused))
        fetched_now = False
        if answer.download_required and answer.checkpoint_url and weights is None:
            dest = weights_for(answer.stage)
            if dest is not None:
                url = answer.checkpoint_url
                weights, progress = _fetch_weights(url, dest, emit, client.auth_for(url))
                fetched_now = progress.complete
        # a node held back only by its download may be admitted the moment it has the weights: ask at once
        pause = 0.0 if fetched_now else answer.next_poll_seconds
        if time.monotonic() + pause > deadline:
            raise AdmissionError(AUTH_TIMEOUT_MESSAGE.format(seconds=role.wait_timeout))
        if stop.wait(pause):  # the coordinator says when to ask again
            raise AdmissionError("stopped while waiting in the authorization queue")
        status = ticket.model_copy(update={"download": progress})
        answer = _unless_stopped(stop, lambda: client.authorization_status(status))
    emit(ev.AccessGranted(username=answer.username, stage=answer.stage, expires_at=answer.expires_at,
                          dashboard_url=answer.dashboard_url))
    return answer, weights


def _unless_stopped(stop: threading.Event, call: Callable[[], Answer]) -> Answer:
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


def _fetch_weights(url: str, dest: Path, emit: Callable[[ev.Event], None], headers: dict[str, str]) -> tuple[Path | None, DownloadProgress]:
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
        return None, DownloadProgress(complete=False, bytes_done=done.stat().st_size if done.exists() else 0)
    emit(ev.DownloadComplete(path=str(result.path), size=result.size, resumed_from=result.resumed_from))
    return result.path, DownloadProgress(complete=True, bytes_done=result.size, bytes_total=result.size)
