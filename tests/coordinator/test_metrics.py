"""/metrics scraped over real HTTP and read with prometheus_client's own parser."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from .conftest import CoordinatorHarness
from .test_api import join


def scrape(coord) -> dict[tuple[str, tuple], float]:
    response = coord.http.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


def test_metrics_follow_admissions_refusals_heartbeats_and_work(harness, listener, tmp_path):
    coord = harness.start(queue={"capacity": 2})
    alice, bob, carol = harness.node("alice"), harness.node("bob"), harness.node("carol")
    a, b = (join(coord, n, listener.port).json() for n in (alice, bob))
    assert join(coord, carol, listener.port).json()["status"] == "queued"
    bad = coord.http.put("/api/join", json=alice.join_body(listener.port), headers={"Authorization": "Bearer wrong"})
    assert bad.status_code == 401
    for seconds, samples in ((0, 10), (30, 40)):
        raw, headers = alice.signed_heartbeat(a["uid"], harness.clock.now + seconds, samples, samples * 128)
        harness.clock.advance(seconds)
        assert coord.http.put("/api/heartbeat", content=raw, headers=headers).status_code == 200
    raw, headers = bob.signed_heartbeat(b["uid"], harness.clock.now, 5, 5 * 128)
    assert coord.http.put("/api/heartbeat", content=raw, headers=headers).status_code == 200
    assert coord.http.put("/api/heartbeat", content=raw, headers=headers).status_code == 409  # replayed

    m = scrape(coord)
    stage = lambda name: (("stage", name),)  # noqa: E731
    assert [m["agora_coordinator_active_nodes", stage(s)] for s in ("head", "body1", "tail")] == [1, 1, 0]
    assert m["agora_coordinator_stage_need", stage("tail")] == 1
    assert m["agora_coordinator_queue_length", ()] == 1
    assert m["agora_coordinator_admissions_total", stage("head")] == 1
    assert m["agora_coordinator_admissions_total", stage("tail")] == 0
    assert m["agora_coordinator_refusals_total", (("reason", "invalid_token"),)] == 1
    assert m["agora_coordinator_refusals_total", (("reason", "stale_heartbeat"),)] == 1
    assert m["agora_coordinator_heartbeats_total", ()] == 3
    assert (m["agora_coordinator_samples_total", stage("head")], m["agora_coordinator_tokens_total", stage("head")]) == (40, 40 * 128)
    assert m["agora_coordinator_samples_total", stage("body1")] == 5

    # a second coordinator in this process counts for itself: its registry is its own
    other = CoordinatorHarness(tmp_path / "other")
    try:
        fresh = scrape(other.start())
        assert fresh["agora_coordinator_heartbeats_total", ()] == 0
        assert ("agora_coordinator_refusals_total", (("reason", "invalid_token"),)) not in fresh
    finally:
        other.stop_all()


def test_paused_joins_report_no_wait_estimate(harness, listener):
    coord = harness.start(queue={"joins_paused": True})
    assert join(coord, harness.node(), listener.port).json()["status"] == "queued"
    m = scrape(coord)
    assert m["agora_coordinator_joins_paused", ()] == 1 and m["agora_coordinator_queue_length", ()] == 1
    assert ("agora_coordinator_estimated_wait_seconds", ()) not in m
