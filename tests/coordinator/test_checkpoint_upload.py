"""A checkpoint upload that outlasts the access token: through a link that sends 800 KB/s upstream per
connection, a real coordinator receives a checkpoint for several token lifetimes while the worker's
session goes on heartbeating and renewing its token on time. And an upload whose connection drops
mid-way continues from what arrived."""

from __future__ import annotations

import hashlib
import threading
import time

import pytest

from agora.coordinator.app import create_app
from agora.membership.checkpoint_upload import CheckpointUploader
from agora.membership.client import CoordinatorClient
from agora.membership.session import CoordinatorSession
from agora.protocol import AccessAnswer
from agora_server.telemetry import events as ev
from tests.coordinator.conftest import RunningCoordinator
from tests.helpers.throttled_proxy import ThrottledProxy

from .test_api import join
from .conftest import stage_state

RATE = 800_000  # bytes per second, per connection
CHECKPOINT_BYTES = 8_000_000  # 10 s through the link, twice what the kernel buffers hold
LIFETIME = 4.0  # the access token's, in seconds: renewed every ~2.7 s
HEARTBEAT = 0.5


@pytest.fixture
def coordinator(harness, tmp_path):
    # the coordinator on the wall clock: the token's expiry has to come while the upload runs
    running = RunningCoordinator(create_app(harness.config(checkpoints={"directory": str(tmp_path / "stored")},
                                                           access_token_lifetime_s=LIFETIME), clock=time.time))
    yield running
    running.stop()


@pytest.fixture
def proxy(coordinator):
    p = ThrottledProxy(int(coordinator.url.rsplit(":", 1)[1]), RATE)
    yield p
    p.close()


def stats() -> ev.WorkerStats:
    return ev.WorkerStats(stage="head", peer_id="x", epoch=0, forward_batches=0, backward_batches=0, samples=0, tokens=0,
                          optimizer_steps=0, skipped_steps=0, throughput=0.0, rounds_ok=0, rounds_failed=0, last_group_size=0,
                          bytes_received={}, bytes_sent={}, ram_used_percent=1.0, process_rss_bytes=1, vram_allocated_bytes=None,
                          online_seconds=0.0)


def test_heartbeats_and_renewals_go_on_while_a_slow_upload_runs(coordinator, proxy, harness, listener, tmp_path):
    node = harness.node()
    answer = join(coordinator, node, listener.port).json()
    assert answer["status"] == "access", answer
    access = AccessAnswer.model_validate(answer)
    checkpoint = tmp_path / "head.pt"
    checkpoint.write_bytes(stage_state(CHECKPOINT_BYTES, epoch=3))  # the coordinator takes only what loads as a stage state

    events: list[ev.Event] = []
    uploaded = threading.Event()

    def emit(event: ev.Event) -> None:
        events.append(event)
        if isinstance(event, ev.CheckpointUploaded):
            uploaded.set()

    client = CoordinatorClient(proxy.url, node.token)
    session = CoordinatorSession(client, node.identity, access, emit, heartbeat_interval=HEARTBEAT)
    uploader = CheckpointUploader(client.separate(), lambda: session.access, emit, progress_every=1.0, chunk_bytes=64_000)
    session.start(stats())
    uploader.start()
    try:
        started = time.monotonic()
        uploader.submit(checkpoint, epoch=3)
        assert uploaded.wait(60), "the upload never finished"
        finished = time.monotonic()
        # while the node still serves the stage: its checkpoint goes only to the stage's nodes
        stored = coordinator.http.get("/api/checkpoints/head", headers=node.auth)
    finally:
        uploader.stop()
        session.stop()

    done = [e for e in events if isinstance(e, ev.CheckpointUploaded)]
    assert [(e.ok, e.epoch) for e in done] == [(True, 3)], done
    assert stored.status_code == 200, stored.text
    assert hashlib.sha256(stored.content).hexdigest() == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert finished - started >= 2 * LIFETIME, "the link was not slow enough to outlast the token"

    # on time all along: no gap between heartbeats much longer than their interval, renewals every lifetime
    beats = [t for t in proxy.times_of("/api/heartbeat") if started <= t <= finished]
    gaps = [b - a for a, b in zip([started, *beats], [*beats, finished])]
    assert max(gaps) < 3 * HEARTBEAT, f"heartbeats waited {max(gaps):.1f}s"
    renewals = [t for t in proxy.times_of("/api/refresh_token") if started <= t <= finished]
    assert len(renewals) >= (finished - started) / LIFETIME - 1, renewals
    assert not [e for e in events if isinstance(e, (ev.CoordinatorStop, ev.CoordinatorUnreachable))]
    assert session.access.expires_at > time.time()

    progress = [e for e in events if isinstance(e, ev.CheckpointUploadProgress)]
    size = checkpoint.stat().st_size
    assert progress and all(0 < e.sent_bytes < e.total_bytes == size for e in progress)
    assert [e.sent_bytes for e in progress] == sorted(e.sent_bytes for e in progress)


def test_an_upload_cut_midway_continues_from_what_arrived(coordinator, proxy, harness, listener, tmp_path):
    node = harness.node()
    access = AccessAnswer.model_validate(join(coordinator, node, listener.port).json())
    checkpoint = tmp_path / "head.pt"
    checkpoint.write_bytes(stage_state(4_000_000, epoch=5))
    size = checkpoint.stat().st_size
    proxy.cut("/api/checkpoints/head", after_bytes=size // 2)  # the link drops half-way through the body

    events: list[ev.Event] = []
    stored_event = threading.Event()

    def emit(event: ev.Event) -> None:
        events.append(event)
        if isinstance(event, ev.CheckpointUploaded) and event.ok:
            stored_event.set()

    client = CoordinatorClient(proxy.url, node.token)
    session = CoordinatorSession(client, node.identity, access, emit, heartbeat_interval=HEARTBEAT)  # keeps the token renewed
    uploader = CheckpointUploader(client.separate(), lambda: session.access, emit, progress_every=0.2, chunk_bytes=64_000)
    session.start(stats())
    uploader.start()
    try:
        uploader.submit(checkpoint, epoch=5)
        assert stored_event.wait(60), "the upload never finished"
        stored = coordinator.http.get("/api/checkpoints/head", headers=node.auth)
    finally:
        uploader.stop()
        session.stop()

    assert proxy.cuts == 1
    done = [(e.ok, e.epoch) for e in events if isinstance(e, ev.CheckpointUploaded)]
    assert done == [(False, 5), (True, 5)], done
    continued = [e for e in events if isinstance(e, ev.CheckpointUploadProgress) and e.resumed_at]
    # what reached the coordinator before the cut is not sent again: only what the link's buffers held is lost
    in_flight = 512 * 1024
    # what reached the coordinator before the cut is not sent again: the link carried the file once, and
    # again at most what its buffers held when it dropped (sent from the start, it would be 1.5 files)
    assert proxy.bytes_to["/api/checkpoints/head"] <= size + 512 * 1024
    # verified whole, as a single upload is, and stored as the stage's checkpoint
    assert stored.status_code == 200 and stored.headers["x-checkpoint-epoch"] == "5"
    assert hashlib.sha256(stored.content).hexdigest() == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert not [p for p in (tmp_path / "stored" / "head").iterdir() if p.name.startswith(".upload-")]
