"""Callers that try to make the coordinator hold memory, write long lines or keep bad numbers:
each driven through a real uvicorn server and its SQLite file."""

from __future__ import annotations

import hashlib
import io
import os
import socket
import sqlite3

import psutil
import pytest
import torch

from agora.config import load_run_config
from agora.coordinator.app import create_app
from agora.coordinator.checkpoint_check import stage_layouts
from agora.coordinator.tokens import CachingVerifier, HuggingFaceVerifier
from tests.coordinator.conftest import Node, RunningCoordinator, new_identity, stage_state
from tests.helpers.fake_whoami import FakeWhoami

MiB = 2**20


def _send_chunked_until_refused(url: str, path: str, offered: int, chunk: int = MiB) -> tuple[int, bytes]:
    """Stream a chunked body of up to ``offered`` bytes until the server answers; (bytes sent, answer)."""
    host, port = url.removeprefix("http://").split(":")
    sent, block = 0, b"x" * chunk
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"PUT {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n".encode())
        sock.setblocking(False)
        answer = b""
        while sent < offered:
            try:
                answer += sock.recv(65536)
            except BlockingIOError:
                pass
            if answer:
                break
            try:
                sent += sock.send(f"{chunk:x}\r\n".encode() + block + b"\r\n") and chunk
            except BlockingIOError:
                continue  # the server stopped reading: wait for its answer
            except (BrokenPipeError, ConnectionResetError):
                break
        sock.setblocking(True)
        try:
            while b"\r\n\r\n" not in answer:
                more = sock.recv(65536)
                if not more:
                    break
                answer += more
        except ConnectionResetError:
            pass
    return sent, answer


def test_an_oversize_body_is_refused_before_the_token_check(harness):
    coord = harness.start()
    declared = coord.http.put("/api/join", content=b"{" + b" " * (2 * MiB) + b"}",
                              headers={"Content-Type": "application/json"})  # no token at all
    assert declared.status_code == 413, declared.text  # refused on the declared length, nothing read


def test_a_body_that_grows_past_the_limit_gets_the_coordinators_refusal(harness):
    coord = harness.start()
    chunks = (b" " * 65536 for _ in range(4))  # no Content-Length: only counting finds out
    answer = coord.http.put("/api/join", content=chunks, headers={"Content-Type": "application/json"})
    assert answer.status_code == 413, answer.text
    assert answer.json()["error"] == "request_too_large"
    assert str(64 * 2**10) in answer.json()["detail"]


def test_a_streamed_body_is_cut_off_at_the_limit_and_memory_stays_bounded(harness):
    coord = harness.start()
    process = psutil.Process()  # the coordinator runs in this process's thread
    before = process.memory_info().rss
    sent, answer = _send_chunked_until_refused(coord.url, "/api/join", offered=512 * MiB)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    # the kernel's socket buffers take a few MiB before the refusal is read; never the whole body
    assert sent < 64 * MiB, sent
    assert process.memory_info().rss - before < 64 * MiB
    assert coord.http.get("/api/run_info").status_code == 200, "the coordinator still serves"


def test_caller_text_comes_back_clipped(harness, listener):
    coord = harness.start(max_request_bytes=2 * MiB)
    node = harness.node()
    long_name = "n" * MiB
    answer = coord.http.put("/api/join", json=node.join_body(listener.port, device=long_name), headers=node.auth)
    assert answer.status_code == 422
    assert len(answer.content) < 4096, len(answer.content)
    assert "chars)" in answer.text


def _heartbeat(coord, node, uid, sent_at, samples, tokens, **extra):
    raw, headers = node.signed_heartbeat(uid, sent_at, samples, tokens, **extra)
    answer = coord.http.put("/api/heartbeat", content=raw, headers=headers)
    assert answer.status_code == 200, answer.text
    return answer


def _credited(coord) -> tuple[int, int]:
    [record] = coord.http.get("/api/contributions").json()
    return record["samples"], record["tokens"]


def test_a_forged_contribution_is_credited_only_what_the_elapsed_time_allows(harness, listener):
    limits = {"max_samples_per_second": 10.0, "max_tokens_per_second": 1000.0, "slack_s": 0.0}
    coord = harness.start(contributions=limits)
    node = harness.node()
    uid = coord.http.put("/api/join", json=node.join_body(listener.port), headers=node.auth).json()["uid"]
    harness.clock.advance(30)
    _heartbeat(coord, node, uid, harness.clock.now, 2**53, 2**53, session="a")
    assert _credited(coord) == (300, 30_000), "30 s at 10 samples/s and 1000 tokens/s"
    harness.clock.advance(30)
    _heartbeat(coord, node, uid, harness.clock.now, 2**53, 2**53, session="a")
    assert _credited(coord) == (300, 30_000), "no new work reported, nothing owed from before"

    # a restart is a new session: its totals start from zero again, within the same bound
    harness.clock.advance(10)
    _heartbeat(coord, node, uid, harness.clock.now, 50, 5_000, session="b")
    assert _credited(coord) == (350, 35_000)
    # a lower total in the same session is no restart and credits nothing
    harness.clock.advance(10)
    _heartbeat(coord, node, uid, harness.clock.now, 10, 1_000, session="b")
    harness.clock.advance(10)
    _heartbeat(coord, node, uid, harness.clock.now, 60, 6_000, session="b")
    assert _credited(coord) == (360, 36_000), "credited from the highest total of the session (50), not from 10"


def test_huge_counters_never_break_the_dashboard_or_metrics(harness, listener):
    generous = {"max_samples_per_second": 1e15, "max_tokens_per_second": 1e15}
    coord = harness.start(queue={"max_active_per_user": 10}, contributions=generous,
                          stages=[{"name": "head", "need": 3}, {"name": "body1", "need": 1}, {"name": "tail", "need": 1}])
    nodes = [harness.node() for _ in range(3)]
    uids = [coord.http.put("/api/join", json=n.join_body(listener.port), headers=n.auth).json()["uid"] for n in nodes]
    for session in ("a", "b", "c"):  # three restarts, each claiming 2^53: the counter would pass it
        harness.clock.advance(300)
        for node, uid in zip(nodes, uids):
            _heartbeat(coord, node, uid, harness.clock.now, 2**53, 2**53, session=session)
    records = coord.http.get("/api/contributions").json()
    assert [(r["samples"], r["tokens"]) for r in records] == [(2**53, 2**53)] * 3, "each counter stops at its ceiling"

    # counters an older coordinator let grow: their sum passes SQLite's 64-bit integers
    with sqlite3.connect(harness.tmp_path / "coordinator.db") as db:
        db.execute("UPDATE contributions SET samples = ?, tokens = ?", (2**63 - 1, 2**63 - 1))
    metrics = coord.http.get("/metrics")
    assert metrics.status_code == 200, metrics.text
    samples = [float(line.rsplit(" ", 1)[1]) for line in metrics.text.splitlines()
               if line.startswith("agora_coordinator_samples_total{")]
    assert sum(samples) == pytest.approx(3 * (2**63 - 1))
    for page in ("/api/contributions", "/api/nodes", "/api/run_info", "/dashboard/snapshot"):
        assert coord.http.get(page).status_code == 200, page


def test_refused_tokens_are_remembered_so_strangers_cannot_spend_the_whoami_limit(harness, listener):
    whoami = FakeWhoami({"hf_good": "dave"})
    try:
        verifier = CachingVerifier(HuggingFaceVerifier(endpoint=whoami.url), ttl_s=300, clock=harness.clock, failure_ttl_s=60)
        coord = RunningCoordinator(create_app(harness.config(), verifier=verifier, clock=harness.clock))
        harness.running.append(coord)
        stranger = {"Authorization": "Bearer hf_bad"}
        for _ in range(5):
            assert coord.http.put("/api/refresh_token", json={"peer_id": "x", "uid": "y"}, headers=stranger).status_code == 401
        assert whoami.calls["hf_bad"] == 1, "refused once by Hugging Face, then from memory"
        harness.clock.advance(61)
        assert coord.http.put("/api/refresh_token", json={"peer_id": "x", "uid": "y"}, headers=stranger).status_code == 401
        assert whoami.calls["hf_bad"] == 2, "asked again once the refusal is old"
        node = Node("hf_good", new_identity())
        for _ in range(3):
            assert coord.http.put("/api/join", json=node.join_body(listener.port), headers=node.auth).status_code in (200, 409)
        assert whoami.calls["hf_good"] == 1
    finally:
        whoami.close()


def test_one_address_cannot_spend_the_whoami_limit_with_made_up_tokens(harness, listener):
    whoami = FakeWhoami({"hf_good": "dave"})
    try:
        verifier = CachingVerifier(HuggingFaceVerifier(endpoint=whoami.url), ttl_s=300, clock=harness.clock, failure_ttl_s=60)
        config = harness.config().model_copy(update={"new_tokens_per_minute": 5})
        coord = RunningCoordinator(create_app(config, verifier=verifier, clock=harness.clock))
        harness.running.append(coord)
        node = Node("hf_good", new_identity())
        assert coord.http.put("/api/join", json=node.join_body(listener.port), headers=node.auth).status_code == 200

        def refresh(token: str):
            return coord.http.put("/api/refresh_token", json={"peer_id": "x", "uid": "y"}, headers={"Authorization": f"Bearer {token}"})

        answers = [refresh(f"hf_made_up_{i}").status_code for i in range(8)]
        assert answers == [401] * 4 + [429] * 4, "the known token spent one of the 5; then 4 new tokens, then refused"
        assert sum(calls for token, calls in whoami.calls.items() if token.startswith("hf_made_up")) == 4
        assert "wait a minute" in refresh("hf_made_up_again").json()["detail"]
        assert refresh("hf_made_up_0").status_code == 401, "a remembered refusal costs nothing and is answered as before"
        assert coord.http.put("/api/join", json=node.join_body(listener.port), headers=node.auth).status_code in (200, 409), \
            "a remembered participant is not held back by a stranger at the same address"
        harness.clock.advance(61)
        assert refresh("hf_made_up_new").status_code == 401, "a minute later the address may check new tokens again"
    finally:
        whoami.close()


def _saved(state) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


class _RunsCode:
    """A pickle that would run a command when loaded without weights_only."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_only_a_valid_state_of_the_stage_replaces_its_checkpoint(harness, listener, tmp_path):
    coord = harness.start(checkpoints={"directory": str(tmp_path / "checkpoints")}, run_config="local-tiny")
    node = harness.node()
    access = coord.http.put("/api/join", json=node.join_body(listener.port), headers=node.auth).json()
    assert access["stage"] == "head"
    auth = {"Authorization": f"Bearer {access['access_token']}"}
    layout = stage_layouts(load_run_config("local-tiny"))["head"]

    def state(epoch=3, **changes):
        weights = {name: torch.zeros(shape, dtype=dtype) for name, (shape, dtype) in layout.items()}
        weights.update(changes.pop("weights", {}))
        for name in changes.pop("drop", ()):
            del weights[name]
        return {"model": weights, "optimizer": changes.pop("optimizer", {"state": {0: {"exp_avg": torch.zeros(4)}}}),
                "epoch": epoch}

    good = _saved(state())
    first = coord.http.put("/api/checkpoints/head", content=good, headers={**auth, "X-Checkpoint-Epoch": "3"})
    assert first.status_code == 200, first.text

    marker = tmp_path / "code-ran"
    name, (shape, _) = next(iter(layout.items()))
    junk = {
        "random bytes": os.urandom(5000),
        "a pickle that runs code": _saved({"model": _RunsCode(marker), "optimizer": {}, "epoch": 0}),
        "not a stage state": _saved({"weights": torch.zeros(3)}),
        "a weight missing": _saved(state(drop=[name])),
        "an extra weight": _saved(state(weights={"extra.weight": torch.zeros(2)})),
        "a wrong shape": _saved(state(weights={name: torch.zeros(shape[0] + 1, *shape[1:])})),
        "a wrong dtype": _saved(state(weights={name: torch.zeros(shape, dtype=torch.bfloat16)})),
        "a NaN weight": _saved(state(weights={name: torch.full(shape, float("nan"))})),
        "an infinite optimizer value": _saved(state(optimizer={"state": {0: {"exp_avg": torch.tensor([float("inf")])}}})),
        "another epoch than announced": _saved(state(epoch=4)),
    }
    for what, content in junk.items():
        answer = coord.http.put("/api/checkpoints/head", content=content, headers={**auth, "X-Checkpoint-Epoch": "3"})
        assert answer.status_code == 400, (what, answer.text)
        assert answer.json()["error"] == "invalid_checkpoint", what
        assert coord.http.get("/api/checkpoints/head", headers=auth).content == good, f"{what} replaced the checkpoint"
    assert not marker.exists(), "loading an upload ran its code"
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "head").iterdir()) == [hashlib.sha256(good).hexdigest()]


def test_a_stages_checkpoint_goes_only_to_that_stages_nodes(harness, listener, tmp_path):
    coord = harness.start(checkpoints={"directory": str(tmp_path / "checkpoints")}, operators=["carol"])
    alice, bob = harness.node("alice"), harness.node("bob")
    on_head = coord.http.put("/api/join", json=alice.join_body(listener.port), headers=alice.auth).json()
    on_body = coord.http.put("/api/join", json=bob.join_body(listener.port), headers=bob.auth).json()
    assert (on_head["stage"], on_body["stage"]) == ("head", "body1")
    state = stage_state(1000, counters={"forward_batches": 9})
    assert coord.http.put("/api/checkpoints/head", content=state,
                          headers={"Authorization": f"Bearer {on_head['access_token']}"}).status_code == 200

    def download(token):
        return coord.http.get("/api/checkpoints/head", headers={"Authorization": f"Bearer {token}"} if token else {})

    assert download(None).status_code == 401, "a stranger gets nothing, not even the uploader's counters"
    assert download("hf_not_a_token").status_code == 401
    assert download(harness.tokens["bob"]).status_code == 403, "an account on another stage"
    assert download(on_body["access_token"]).status_code == 403, "a node of another stage"
    for allowed in (harness.tokens["alice"], on_head["access_token"], harness.tokens["carol"]):
        answer = download(allowed)
        assert answer.status_code == 200 and answer.content == state
    assert "uploader" not in str(download(None).headers).lower()
