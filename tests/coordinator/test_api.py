"""The coordinator's HTTP rules, each driven through a real uvicorn server and its SQLite file."""

from __future__ import annotations

import base64
import socket
import sqlite3

import pytest

from agora_server.access import verify_access_token

INVALID_TOKEN = "Invalid HuggingFace token"
PEER_ID_TAKEN = "This peer_id is already used by another user"
ALREADY_QUEUED = "This node is already in the authorization queue. Please remove private key from the node and try again."
DOWNLOAD_TOO_SLOW = "Download is too slow, please ensure sufficient bandwidth and try again."
VERIFICATION_FAILED = "Verification failed."
PORT_TEST_FAILED = "Port test failed. Make sure your port forwarding is correct"


def join(coord, node, port, **overrides):
    return coord.http.put("/api/join", json=node.join_body(port, **overrides), headers=node.auth)


def poll(coord, node, queued, **download):
    body = {"request_id": queued["request_id"], "session_token": queued["session_token"]}
    if download:
        body["download"] = download
    return coord.http.put("/api/authorization_status", json=body, headers=node.auth)


def refused(response, status: int, detail: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["detail"] == detail


def closed_port() -> int:
    with socket.socket() as s:  # bound, never listening: connecting is refused at once
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_join_with_free_capacity_grants_signed_access(harness, listener):
    coord = harness.start()
    node = harness.node("alice")
    answer = join(coord, node, listener.port).json()
    assert answer["status"] == "access"
    assert (answer["stage"], answer["username"], answer["peer_id"]) == ("head", "alice", node.peer_id)
    assert answer["checkpoint_url"] is None
    claims = verify_access_token(answer["access_token"], answer["coordinator_public_key"], now=harness.clock.now)
    assert (claims.peer_id, claims.stage, claims.username, claims.uid) == (node.peer_id, "head", "alice", answer["uid"])
    assert claims.expires_at == answer["expires_at"] == pytest.approx(harness.clock.now + 1800)
    assert claims.role == "worker"
    assert base64.b64decode(claims.public_key) == node.identity.public_key_protobuf, "peers check its DHT records with this key"


def test_invalid_or_missing_token_is_refused_with_the_guides_message(harness, listener):
    coord = harness.start()
    node = harness.node("alice")
    body = node.join_body(listener.port)
    refused(coord.http.put("/api/join", json=body, headers={"Authorization": "Bearer hf_not_a_real_token"}), 401, INVALID_TOKEN)
    refused(coord.http.put("/api/join", json=body), 401, INVALID_TOKEN)
    # the rejected token must not leak back into the answer
    assert "hf_not_a_real_token" not in coord.http.put("/api/join", json=body, headers={"Authorization": "Bearer hf_not_a_real_token"}).text


def test_a_peer_id_stays_with_the_account_that_first_used_it(harness, listener):
    coord = harness.start()
    alice = harness.node("alice")
    assert join(coord, alice, listener.port).json()["status"] == "access"
    bob_with_alices_key = harness.node("bob", alice.identity)
    refused(join(coord, bob_with_alices_key, listener.port), 403, PEER_ID_TAKEN)


def test_a_queued_node_cannot_queue_twice(harness, listener):
    coord = harness.start(queue={"capacity": 1})
    assert join(coord, harness.node("alice"), listener.port).json()["status"] == "access"
    waiting = harness.node("bob")
    assert join(coord, waiting, listener.port).json()["status"] == "queued"
    refused(join(coord, waiting, listener.port), 409, ALREADY_QUEUED)


def test_a_wrong_code_version_fails_verification(harness, listener):
    coord = harness.start()
    refused(join(coord, harness.node(), listener.port, code_version="v-stale"), 403, VERIFICATION_FAILED)


def test_port_test_needs_a_listener_that_answers(harness, listener):
    coord = harness.start(port_test={"deadline_s": 1.0})
    node = harness.node("alice")
    refused(join(coord, node, closed_port()), 400, PORT_TEST_FAILED)
    # a failed join binds nothing: another account may still use this identity
    assert join(coord, harness.node("bob", node.identity), listener.port).json()["status"] == "access"


def test_port_test_is_only_aimed_at_the_callers_address(harness, listener):
    coord = harness.start()
    answer = join(coord, harness.node(), listener.port, announce_ip="10.1.2.3")
    assert answer.status_code == 400 and "10.1.2.3" in answer.json()["detail"]
    assert join(coord, harness.node(), listener.port, announce_ip="127.0.0.1").json()["status"] == "access"


def test_per_account_cap_counts_active_and_waiting_nodes(harness, listener):
    coord = harness.start(queue={"capacity": 2, "max_active_per_user": 2})
    assert join(coord, harness.node("alice"), listener.port).json()["status"] == "access"
    assert join(coord, harness.node("alice"), listener.port).json()["status"] == "access"
    third = join(coord, harness.node("alice"), listener.port)
    assert third.status_code == 429
    assert "2 node(s) active or waiting" in third.json()["detail"]
    # the cap is per account, not per run
    assert join(coord, harness.node("bob"), listener.port).json()["status"] == "queued"


def test_slow_download_drops_the_node_from_the_queue(harness, listener):
    coord = harness.start(checkpoint_url_template="http://127.0.0.1:9/checkpoints/{stage}",
                          queue={"download_deadline_s": 100, "abandon_after_s": 10_000})
    slow, fast = harness.node("alice"), harness.node("bob")
    slow_q = join(coord, slow, listener.port).json()
    fast_q = join(coord, fast, listener.port).json()
    assert slow_q["status"] == fast_q["status"] == "queued", "with weights to fetch nobody is admitted before downloading"
    assert slow_q["download_required"] and slow_q["checkpoint_url"] == f"http://127.0.0.1:9/checkpoints/{slow_q['stage']}"
    assert (slow_q["position"], fast_q["position"]) == (1, 2)

    harness.clock.advance(50)
    assert poll(coord, slow, slow_q, bytes_done=10, bytes_total=1000).json()["status"] == "queued"
    granted = poll(coord, fast, fast_q, bytes_done=1000, bytes_total=1000, complete=True).json()
    assert granted["status"] == "access", "a finished download is admitted even behind a slow one"
    harness.clock.advance(51)
    refused(poll(coord, slow, slow_q, bytes_done=20, bytes_total=1000), 410, DOWNLOAD_TOO_SLOW)
    with sqlite3.connect(harness.tmp_path / "coordinator.db") as db:  # read before any other call could commit it
        status = db.execute("SELECT status, drop_reason FROM queue_requests WHERE request_id = ?", (slow_q["request_id"],)).fetchone()
    assert status[0] == "dropped", "the refusal's own poll records the drop (it used to roll it back)"


def test_queue_positions_and_wait_estimate_follow_observed_departures(harness, listener):
    coord = harness.start(access_token_lifetime_s=100,
                          queue={"capacity": 1, "poll_interval_s": 10, "abandon_after_s": 10_000, "max_active_per_user": 5})
    a, b, c, d = (harness.node(u) for u in ("alice", "bob", "carol", "alice"))
    assert join(coord, a, listener.port).json()["status"] == "access"
    qb, qc, qd = (join(coord, n, listener.port).json() for n in (b, c, d))
    assert [q["position"] for q in (qb, qc, qd)] == [1, 2, 3]
    # nobody has left the full run yet: no figure rather than a made-up one
    assert [q["estimated_wait_seconds"] for q in (qb, qc, qd)] == [None, None, None]
    assert qb["next_poll_seconds"] == 10 and not qb["joins_paused"]
    assert "fewer than two nodes have left" in coord.http.get("/api/run_info").json()["wait_estimate_basis"]

    harness.clock.advance(100)  # a's access runs out unrefreshed: b moves up
    assert poll(coord, b, qb).json()["status"] == "access"
    harness.clock.advance(100)
    assert poll(coord, c, qc).json()["status"] == "access"
    # two departures 100 s apart: a place frees up every 100 s
    still = poll(coord, d, qd).json()
    assert (still["status"], still["position"], still["estimated_wait_seconds"]) == ("queued", 1, 100)
    assert still["session_token"] is None, "the session token is only handed out once"
    info = coord.http.get("/api/run_info").json()
    assert (info["queue_length"], info["active_nodes"], info["estimated_wait_seconds"]) == (1, 1, 200)
    assert info["wait_estimate_basis"] == "a place freed up every 100s on average over the last 2 departures"


def test_paused_joins_queue_everyone_and_admit_nobody(harness, listener):
    coord = harness.start(queue={"joins_paused": True})
    answer = join(coord, harness.node(), listener.port).json()
    assert (answer["status"], answer["joins_paused"], answer["estimated_wait_seconds"]) == ("queued", True, None)
    info = coord.http.get("/api/run_info").json()
    assert info["joins_paused"] and info["queue_length"] == 1 and info["active_nodes"] == 0


def test_status_poll_checks_request_session_and_account(harness, listener):
    coord = harness.start(queue={"capacity": 1})
    join(coord, harness.node("alice"), listener.port)
    bob = harness.node("bob")
    queued = join(coord, bob, listener.port).json()
    assert poll(coord, bob, {**queued, "request_id": "nope"}).status_code == 404
    assert poll(coord, bob, {**queued, "session_token": "guess"}).status_code == 403
    assert poll(coord, harness.node("carol"), queued).status_code == 403
    assert poll(coord, bob, queued).json()["position"] == 1


def test_refresh_extends_access_until_it_has_run_out(harness, listener):
    coord = harness.start(access_token_lifetime_s=100)
    node = harness.node("alice")
    access = join(coord, node, listener.port).json()
    body = {"peer_id": node.peer_id, "uid": access["uid"]}
    harness.clock.advance(60)
    renewed = coord.http.put("/api/refresh_token", json=body, headers=node.auth).json()
    assert renewed["expires_at"] == pytest.approx(access["expires_at"] + 60)
    claims = verify_access_token(renewed["access_token"], renewed["coordinator_public_key"], now=harness.clock.now + 90)
    assert claims.expires_at == renewed["expires_at"]
    assert coord.http.put("/api/refresh_token", json=body, headers=harness.node("bob").auth).status_code == 403
    harness.clock.advance(101)
    assert coord.http.put("/api/refresh_token", json=body, headers=node.auth).status_code == 410


def test_heartbeat_must_be_signed_by_the_nodes_identity(harness, listener):
    coord = harness.start()
    node = harness.node("alice")
    uid = join(coord, node, listener.port).json()["uid"]
    now = harness.clock.now

    raw, headers = node.signed_heartbeat(uid, now, samples=64, tokens=64 * 512)
    ok = coord.http.put("/api/heartbeat", content=raw, headers=headers)
    assert ok.status_code == 200, ok.text
    assert ok.json()["move_to_stage"] is None

    harness.clock.advance(30)
    raw, headers = node.signed_heartbeat(uid, now + 30, samples=100, tokens=100 * 512)
    forger = harness.node("alice")  # same account, different key
    forged = {**headers, "X-Agora-Signature": base64.b64encode(forger.identity.sign(raw)).decode()}
    assert coord.http.put("/api/heartbeat", content=raw, headers=forged).status_code == 401
    tampered = raw.replace(b'"samples_processed": 100', b'"samples_processed": 999')
    assert coord.http.put("/api/heartbeat", content=tampered, headers=headers).status_code == 401
    no_signature = {k: v for k, v in headers.items() if k != "X-Agora-Signature"}
    assert coord.http.put("/api/heartbeat", content=raw, headers=no_signature).status_code == 422
    assert coord.http.put("/api/heartbeat", content=raw, headers=headers).status_code == 200
    assert coord.http.put("/api/heartbeat", content=raw, headers=headers).status_code == 409, "a replay is refused"

    [record] = coord.http.get("/api/contributions").json()
    assert (record["username"], record["stage"], record["samples"], record["tokens"]) == ("alice", "head", 100, 100 * 512)
    assert record["seconds_online"] == pytest.approx(30)


def empty_the_tail(harness, listener):
    """Four nodes of alice on head×2, body1, tail; then the tail node's access lapses."""
    coord = harness.start(access_token_lifetime_s=100, queue={"max_active_per_user": 10},
                          stages=[{"name": "head", "need": 2}, {"name": "body1", "need": 1}, {"name": "tail", "need": 1}])
    nodes = [harness.node("alice") for _ in range(4)]
    stages = []
    for node in nodes:  # one second apart, so "the newest worker" is well defined
        stages.append(join(coord, node, listener.port).json())
        harness.clock.advance(1)
    assert [a["stage"] for a in stages] == ["head", "body1", "tail", "head"]
    assert [s["workers"] for s in coord.http.get("/api/run_info").json()["stages"]] == [2, 1, 1]

    harness.clock.advance(60)  # everyone but the tail node keeps its access
    for node, access in zip(nodes, stages):
        if access["stage"] != "tail":
            coord.http.put("/api/refresh_token", json={"peer_id": node.peer_id, "uid": access["uid"]}, headers=node.auth)
    harness.clock.advance(60)
    return coord, nodes, stages


def test_stages_fill_by_need_and_an_emptied_stage_is_refilled(harness, listener):
    coord, nodes, stages = empty_the_tail(harness, listener)
    older_head, newest_head = nodes[0], nodes[3]
    raw, headers = older_head.signed_heartbeat(stages[0]["uid"], harness.clock.now, 1, 1)
    assert coord.http.put("/api/heartbeat", content=raw, headers=headers).json()["move_to_stage"] is None
    raw, headers = newest_head.signed_heartbeat(stages[3]["uid"], harness.clock.now, 1, 1)
    moved = coord.http.put("/api/heartbeat", content=raw, headers=headers).json()
    assert moved["move_to_stage"] == "tail"
    claims = verify_access_token(moved["access_token"], stages[3]["coordinator_public_key"], now=harness.clock.now)
    assert (claims.stage, claims.peer_id) == ("tail", newest_head.peer_id)
    assert [s["workers"] for s in coord.http.get("/api/run_info").json()["stages"]] == [1, 1, 1]


def test_malformed_requests_get_clear_4xx_answers(harness, listener):
    coord = harness.start()
    node = harness.node()
    not_json = coord.http.put("/api/join", content=b"{not json", headers={**node.auth, "Content-Type": "application/json"})
    assert not_json.status_code == 422
    missing = coord.http.put("/api/join", json={"peer_id": node.peer_id}, headers=node.auth)
    assert missing.status_code == 422 and "announce_port" in missing.text
    bad_key = join(coord, node, listener.port, public_key="***")
    assert bad_key.status_code == 400 and "public_key" in bad_key.json()["detail"]
    other_key = base64.b64encode(harness.node().identity.public_key_protobuf).decode()
    mismatch = join(coord, node, listener.port, public_key=other_key)
    assert mismatch.status_code == 400 and "peer_id" in mismatch.json()["detail"]
    assert join(coord, node, 70000).status_code == 422


def test_only_operators_stop_nodes_and_the_node_learns_why(harness, listener):
    coord = harness.start(operators=["bob"])
    node = harness.node("alice")
    uid = join(coord, node, listener.port).json()["uid"]
    stop = {"peer_id": node.peer_id, "reason": "disk full on the host"}

    refused = coord.http.post("/api/admin/stop_node", json=stop, headers=node.auth)
    assert refused.status_code == 403 and refused.json()["detail"] == "Only the run's operators may stop nodes or run trainers."
    operator = harness.node("bob").auth
    assert coord.http.post("/api/admin/stop_node", json=stop, headers=operator).json() == {"peer_id": node.peer_id, "was_active": True}

    raw, headers = node.signed_heartbeat(uid, harness.clock.now, samples=1, tokens=1)
    answer = coord.http.put("/api/heartbeat", content=raw, headers=headers)
    assert answer.status_code == 410 and answer.json()["detail"] == "The run's operators stopped this node: disk full on the host"
    assert coord.http.put("/api/refresh_token", json={"peer_id": node.peer_id, "uid": uid}, headers=node.auth).status_code == 410
    assert coord.http.get("/api/run_info").json()["active_nodes"] == 0, "its place is free at once"
    assert join(coord, node, listener.port).json()["status"] == "access", "joining again starts a new session"


def test_trainer_access_is_for_operators_and_names_the_trainers_key(harness):
    coord = harness.start(operators=["bob"])
    trainer = harness.node("bob")
    body = {"peer_id": trainer.peer_id, "public_key": base64.b64encode(trainer.identity.public_key_protobuf).decode()}
    answer = coord.http.put("/api/trainer_access", json=body, headers=trainer.auth)
    assert answer.status_code == 200, answer.text
    claims = verify_access_token(answer.json()["access_token"], answer.json()["coordinator_public_key"], now=harness.clock.now)
    assert (claims.role, claims.peer_id, claims.username, claims.stage) == ("trainer", trainer.peer_id, "bob", "")
    assert base64.b64decode(claims.public_key) == trainer.identity.public_key_protobuf
    harness.clock.advance(600)
    renewed = coord.http.put("/api/trainer_access", json=body, headers=trainer.auth).json()
    assert renewed["expires_at"] == pytest.approx(harness.clock.now + 1800), "asking again renews it"

    refused(coord.http.put("/api/trainer_access", json={**body}, headers=harness.node("alice").auth), 403,
            "Only the run's operators may stop nodes or run trainers.")
    other_key = base64.b64encode(harness.node().identity.public_key_protobuf).decode()
    mismatch = coord.http.put("/api/trainer_access", json={**body, "public_key": other_key}, headers=trainer.auth)
    assert mismatch.status_code == 400 and "peer_id" in mismatch.json()["detail"]
    assert coord.http.put("/api/trainer_access", json=body).status_code == 401


def test_a_worker_moved_to_an_emptied_stage_stops_and_says_why(harness, listener):
    from agora.membership.client import CoordinatorClient
    from agora.membership.session import CoordinatorSession
    from agora.protocol import AccessAnswer
    from agora_server.telemetry.events import CoordinatorStop, WorkerStats

    coord, nodes, stages = empty_the_tail(harness, listener)
    events = []
    session = CoordinatorSession(CoordinatorClient(coord.url, harness.tokens["alice"]), nodes[3].identity,
                                 AccessAnswer.model_validate(stages[3]), events.append, heartbeat_interval=0.1, clock=harness.clock)
    stats = WorkerStats(stage="head", peer_id=nodes[3].peer_id, epoch=0, forward_batches=1, backward_batches=1, samples=4, tokens=512,
                        optimizer_steps=0, skipped_steps=0, throughput=0.0, rounds_ok=0, rounds_failed=0, last_group_size=0,
                        bytes_received={}, bytes_sent={}, ram_used_percent=1.0, process_rss_bytes=1, vram_allocated_bytes=None,
                        online_seconds=1.0)
    session.start(stats)
    session._thread.join(20)  # the session ends itself once the coordinator answers with a move
    session.stop()
    assert [e.reason for e in events if isinstance(e, CoordinatorStop)] == [
        "The coordinator moved this node to stage tail, which has no workers; start it again to serve there."]
    assert join(coord, nodes[3], listener.port).json()["stage"] == "tail", "joining again serves the stage it was moved to"
