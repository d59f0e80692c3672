"""A worker whose coordinator dies: it keeps serving on the access it holds, retries the coordinator
with a growing backoff, and when the access expires stops with a message that says what happened and
what to do, exits non-zero and leaves no process behind. Real coordinator, seed and worker processes."""

import time

from agora.local_swarm import group_members
from agora_server.access import PREFIX as ACCESS_TOKEN_PREFIX
from agora_server.telemetry import events as ev
from agora_server.telemetry.console import console_lines
from agora_server.telemetry.health import ACCESS_EXPIRED_MESSAGE
from tests.helpers.swarms import console_text

LIFETIME = 45.0  # seconds of access per grant: long enough to start a worker, short enough for a test
WORKER = "head#0"
def granted_expiry(swarm) -> float:
    """The expiry of the access the worker was granted, from its own event."""
    return swarm.events_of(WORKER, ev.AccessGranted)[0].expires_at


def test_a_worker_that_loses_the_coordinator_retries_then_stops_when_its_access_expires(swarm_harness):
    # one worker is enough: the coordinator gives it the first stage and the others stay empty
    swarm = swarm_harness.create(workers={"head": 1, "body1": 0, "tail": 0}, coordinator=True,
                                 coordinator_settings={"access_token_lifetime_s": LIFETIME})
    swarm.start(trainer=False)
    worker = swarm.process(WORKER)
    assert swarm.wait_for(WORKER, ev.ServerStarted, lambda e: e.stage == "head", timeout=60)
    expires_at = granted_expiry(swarm)
    # room for a heartbeat (every 5 s) to fail and for three doublings of the backoff (2 + 4 + 8 s)
    # before the expiry; and no renewal yet (due a third of the lifetime before), which would move it on
    assert time.time() < expires_at - 20, "the worker took too long to start for this test's timing"
    at_outage = swarm.events_sent(WORKER)
    swarm.kill("coordinator")

    def expired(event: ev.HealthStop) -> bool:
        return event.message == ACCESS_EXPIRED_MESSAGE

    # the access is still valid: the worker must carry on (1 s for the event to cross the pipe)
    assert swarm.wait_for(WORKER, ev.HealthStop, expired, timeout=expires_at - 1 - time.time(), since=at_outage) is None, \
        "stopped while its access was still valid"
    assert worker.popen.poll() is None
    verdict = swarm.wait_for(WORKER, ev.HealthStop, expired, timeout=expires_at + 10 - time.time(), since=at_outage)
    assert verdict is not None, "no stop within 10 s of the expiry"
    assert worker.popen.wait(expires_at + 60 - time.time()) == 1, "a worker that lost its access exits non-zero, within a minute"

    outage = swarm.events_of(WORKER, ev.Event, since=at_outage)
    outage = outage[:outage.index(verdict)]
    retries = [e for e in outage if isinstance(e, ev.CoordinatorUnreachable)]
    assert retries and all(e.action in ("report progress", "renew the access token") for e in retries), retries
    assert all("did not answer: ConnectError" in e.error for e in retries), retries
    delays = [round(e.retry_in) for e in retries]
    assert len(delays) >= 3 and delays[:3] == [2, 4, 8], f"the backoff doubles: {delays}"
    assert all(e.retry_in <= e.expires_in for e in retries), f"no retry is planned past the expiry: {delays}"
    assert [e for e in outage if isinstance(e, ev.ProgressReport)], "the worker kept serving through the outage"

    assert verdict.detail.startswith(f"the access token expired at {time.strftime('%H:%M:%S UTC', time.gmtime(expires_at))};"), verdict.detail
    assert verdict.detail.endswith("Check that the coordinator is running and reachable from this machine, then start this node again.")
    stopping = swarm.wait_for(WORKER, ev.ServerStopping, lambda e: e.reason == ACCESS_EXPIRED_MESSAGE, timeout=30, since=at_outage)
    assert stopping
    # text, because the point is what the participant reads: the guide's message with its tags
    lines = [*console_lines(verdict), *console_lines(stopping)]
    assert f"[SERVER] {ACCESS_EXPIRED_MESSAGE}" in lines and f"[SERVER] Stopping: {ACCESS_EXPIRED_MESSAGE}" in lines

    # nothing secret on the console or in the log: neither the participant's token nor an access token
    log = (swarm.log_dir / "server_head_0.log").read_text()
    for text in (console_text(swarm, WORKER), log):
        assert swarm._token not in text and ACCESS_TOKEN_PREFIX not in text

    deadline = time.monotonic() + 10  # its DHT process and p2pd go down with it
    while group_members(worker.pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not group_members(worker.pgid), "the worker left processes behind"
