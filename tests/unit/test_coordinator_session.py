"""CoordinatorSession's timing on a simulated clock: renewals of a short-lived token, the backoff
while the coordinator does not answer, and the stop at (not after) the expiry."""

import re

import pytest

from agora.membership.client import CoordinatorUnavailable
from agora.membership.session import CoordinatorSession
from agora.protocol import AccessAnswer, HeartbeatAnswer
from agora_server.telemetry import events as ev
from agora_server.telemetry.console import console_lines
from agora_server.telemetry.health import ACCESS_EXPIRED_MESSAGE, HealthConfig, HealthMonitor
from tests.helpers.clock import ManualClock

START, LIFETIME, SECRET = 1_000_000.0, 40.0, "secret-access-token"


class SimulatedWake:
    """Stands in for the session's wake-up Event: a wait moves the clock on instead of sleeping."""

    def __init__(self, clock: ManualClock, until: float, stop):
        self.clock, self.until, self.stop = clock, until, stop

    def wait(self, timeout: float) -> bool:
        self.clock.now += timeout
        if self.clock.now > self.until:
            self.stop.set()  # the simulation is over: the session returns at its next check
        return False

    def set(self) -> None:
        pass

    def clear(self) -> None:
        pass


class Coordinator:
    """Answers until ``down_at``; then every call fails as a dead host's would."""

    def __init__(self, clock: ManualClock, down_at: float = float("inf")):
        self.clock, self.down_at, self.calls = clock, down_at, []
        self.expires_at = clock.now + LIFETIME  # the node's access, as the coordinator records it

    def refresh(self, request, *, timeout=None) -> AccessAnswer:
        self._call("/api/refresh_token", timeout)
        self.expires_at = self.clock.now + LIFETIME
        return access(self.expires_at)

    def heartbeat(self, request, identity, *, timeout=None) -> HeartbeatAnswer:
        self._call("/api/heartbeat", timeout)
        return HeartbeatAnswer(expires_at=self.expires_at)

    def _call(self, path, timeout):
        self.calls.append((self.clock.now, path, timeout))
        if self.clock.now >= self.down_at:
            raise CoordinatorUnavailable("the coordinator at http://127.0.0.1:8000 did not answer: ConnectError")

    def close(self):
        pass


class Identity:
    def sign(self, body: bytes) -> bytes:
        return b"signature"


def access(expires_at: float) -> AccessAnswer:
    return AccessAnswer(stage="head", uid="u1", username="alice", peer_id="QmPeer", access_token=SECRET,
                        expires_at=expires_at, checkpoint_url=None, coordinator_public_key="key")


def run_session(coordinator: Coordinator, clock: ManualClock, until: float) -> list[ev.Event]:
    events = []
    session = CoordinatorSession(coordinator, Identity(), access(coordinator.expires_at), events.append, heartbeat_interval=5.0, clock=clock)
    session._wake = SimulatedWake(clock, until, session._stop)
    session._stats = ev.WorkerStats(stage="head", peer_id="QmPeer", epoch=0, forward_batches=0, backward_batches=0, samples=0, tokens=0,
                                    optimizer_steps=0, skipped_steps=0, throughput=0.0, rounds_ok=0, rounds_failed=0, last_group_size=0,
                                    bytes_received={}, bytes_sent={}, ram_used_percent=1.0, process_rss_bytes=1, vram_allocated_bytes=None,
                                    online_seconds=0.0)
    session._loop()  # on this thread: it returns at the stop, or when the simulation ends
    return events


def test_a_short_lived_token_is_renewed_once_per_lifetime_not_at_every_wake_up():
    clock = ManualClock(START)
    coordinator = Coordinator(clock)
    events = run_session(coordinator, clock, until=START + 10 * LIFETIME)
    refreshes = [at - START for at, path, _ in coordinator.calls if path == "/api/refresh_token"]
    # a third of the lifetime before expiry: the production margin of 300 s would exceed the whole lifetime
    assert len(refreshes) >= 9 and refreshes[0] >= LIFETIME * 2 / 3, refreshes
    assert all(LIFETIME * 2 / 3 <= b - a <= LIFETIME * 2 / 3 + 5 for a, b in zip(refreshes, refreshes[1:])), refreshes
    assert not [e for e in events if isinstance(e, (ev.CoordinatorStop, ev.CoordinatorUnreachable))]


def test_an_unreachable_coordinator_is_retried_with_backoff_until_the_token_expires_then_the_worker_stops_at_once():
    clock = ManualClock(START)
    expires_at = START + LIFETIME
    coordinator = Coordinator(clock, down_at=START + 4)
    events = run_session(coordinator, clock, until=START + 10 * LIFETIME)

    unreachable = [e for e in events if isinstance(e, ev.CoordinatorUnreachable)]
    delays = [e.retry_in for e in unreachable]
    assert delays[:4] == [2, 4, 8, 16], delays
    assert all(e.retry_in <= e.expires_in for e in unreachable), "no wait past the expiry"
    assert [e.action for e in unreachable][-1] == "renew the access token", "it was due for renewal when the outage ended"

    stops = [e for e in events if isinstance(e, ev.CoordinatorStop)]
    assert len(stops) == 1 and stops[0].access_expired and isinstance(events[-1], ev.CoordinatorStop)
    last_call = coordinator.calls[-1][0]
    assert expires_at <= last_call <= expires_at + 0.1, "the last try is made at the expiry, not up to a backoff later"
    assert clock.now == last_call, "nothing after the stop"
    assert all(t <= max(1.0, expires_at - at) for at, _, t in coordinator.calls), "no call may hold the worker past the expiry"

    health_stops = []
    health = HealthMonitor(HealthConfig(), health_stops.append)
    health(stops[0])
    lines = [line for e in [*unreachable, health_stops[0]] for line in console_lines(e)]
    assert lines[-2] == f"[SERVER] {ACCESS_EXPIRED_MESSAGE}"
    assert re.fullmatch(r"\[SERVER\] Reason: the access token expired at \d\d:\d\d:\d\d UTC; the coordinator has not answered since "
                        r"\d\d:\d\d:\d\d UTC \(last error: .*ConnectError\)\. Check that the coordinator is running and reachable "
                        r"from this machine, then start this node again\.", lines[-1]), lines[-1]
    assert re.match(r"\[AUTH\] Could not reach the coordinator to report progress \(.*\); retrying in 2s; this node stops in \d+s", lines[0])
    assert not [line for line in lines if SECRET in line]


@pytest.mark.parametrize("down_at", [0.5, 26.9, 27.5, 39.9])
def test_the_stop_comes_at_the_expiry_whenever_the_outage_begins(down_at):
    clock = ManualClock(START)
    coordinator = Coordinator(clock, down_at=START + down_at)
    events = run_session(coordinator, clock, until=START + 10 * LIFETIME)
    stops = [e for e in events if isinstance(e, ev.CoordinatorStop)]
    # a renewal before the outage moves the expiry on by one lifetime
    renewed = [at for at, path, _ in coordinator.calls if path == "/api/refresh_token" and at < START + down_at]
    expires_at = (renewed[-1] if renewed else START) + LIFETIME
    assert len(stops) == 1 and expires_at <= clock.now <= expires_at + 0.1


class TrainerIdentity(Identity):
    peer_id, public_key_protobuf = "QmTrainer", b"public key"


class ShardingCoordinator(Coordinator):
    """Renews a trainer's access, naming the data shard of each answer in turn."""

    def __init__(self, clock: ManualClock, shards: list[tuple[int, int]]):
        super().__init__(clock)
        self.shards = shards

    def trainer_access(self, request, *, timeout=None) -> AccessAnswer:
        self._call("/api/trainer_access", timeout)
        self.expires_at = self.clock.now + LIFETIME
        shard, of = self.shards.pop(0)
        return access(self.expires_at).model_copy(update={"data_shard": shard, "data_shards": of})


def test_a_trainer_whose_renewal_names_another_data_shard_stops_and_says_why():
    clock = ManualClock(START)
    coordinator = ShardingCoordinator(clock, [(1, 2), (0, 1)])
    events = []
    first = access(coordinator.expires_at).model_copy(update={"data_shard": 1, "data_shards": 2})
    session = CoordinatorSession(coordinator, TrainerIdentity(), first, events.append, heartbeat_interval=5.0, clock=clock, trainer=True)
    session._wake = SimulatedWake(clock, START + 10 * LIFETIME, session._stop)
    session._loop()
    renewals = [path for _, path, _ in coordinator.calls if path == "/api/trainer_access"]
    assert len(renewals) == 2, "the first renewal keeps the shard, the second moves it"
    stops = [e for e in events if isinstance(e, ev.CoordinatorStop)]
    assert [s.reason for s in stops] == ["The coordinator now gives this trainer data shard 0 of 1 instead of 1 of 2; "
                                         "start it again to read that shard."]
