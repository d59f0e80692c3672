"""CoordinatorClient reads answers into the protocol's types: a newer coordinator's extra fields are
ignored, an answer it cannot read is an AdmissionError that names the call and the field; a worker's
join polls its queued request with the ticket of the first answer until access comes."""

from __future__ import annotations

import base64
import json

import httpx
import pytest

from agora.membership.client import AdmissionError, CoordinatorClient, MalformedAnswer, build_request
from agora.membership.join import WorkerRole, admit
from agora.ports import free_port
from agora.protocol import SIGNATURE_HEADER, AccessAnswer, HeartbeatAnswer, HeartbeatRequest, JoinRequest, QueuedAnswer
from agora_server.telemetry import events as ev

ACCESS = {"status": "access", "stage": "head", "uid": "u1", "username": "alice", "peer_id": "QmPeer", "access_token": "t",
          "expires_at": 1000.0, "checkpoint_url": None, "coordinator_public_key": "key"}
QUEUED = {"status": "queued", "request_id": "r1", "session_token": "s1", "position": 2, "estimated_wait_seconds": 30.0,
          "next_poll_seconds": 5.0, "joins_paused": False, "stage": "tail", "download_required": False, "checkpoint_url": None}
JOIN = JoinRequest(peer_id="QmPeer", public_key="a2V5", announce_port=49200, code_version="v-test")
HEARTBEAT = HeartbeatRequest(peer_id="QmPeer", uid="u1", sent_at=1.0, samples_processed=3, tokens_processed=384)


class CannedCoordinator:
    """Answers every PUT with the next canned body (200) and keeps the requests it received."""

    def __init__(self, *answers: dict | bytes):
        self.answers = [a if isinstance(a, bytes) else json.dumps(a).encode() for a in answers]
        self.received: list[httpx.Request] = []
        self.client = CoordinatorClient("http://coordinator.test", "hf-token", transport=httpx.MockTransport(self._answer))

    def _answer(self, request: httpx.Request) -> httpx.Response:
        self.received.append(request)
        return httpx.Response(200, content=self.answers.pop(0), headers={"Content-Type": "application/json"})


class Signer:
    def sign(self, body: bytes) -> bytes:
        return b"sig:" + body[:8]


def test_answers_with_fields_this_peer_does_not_know_still_parse():
    coordinator = CannedCoordinator({**QUEUED, "priority_lane": "fast"}, {**ACCESS, "region": "eu", "quota": {"gpus": 2}},
                                    {"expires_at": 1200.0, "reputation": 0.9})
    queued = coordinator.client.join(JOIN)
    assert isinstance(queued, QueuedAnswer) and (queued.position, queued.stage) == (2, "tail")
    assert coordinator.client.join(JOIN) == AccessAnswer.model_validate(ACCESS)
    assert coordinator.client.heartbeat(HEARTBEAT, Signer()) == HeartbeatAnswer(expires_at=1200.0)


@pytest.mark.parametrize("answer, problem", [
    ({key: value for key, value in QUEUED.items() if key != "position"}, "position: Field required"),
    ({**ACCESS, "expires_at": "soon"}, "access.expires_at: Input should be a valid number"),
    ({**ACCESS, "status": "refused"}, "does not match any of the expected tags"),
    (b"<html>Sign in to the hotel wifi</html>", "Invalid JSON"),
])
def test_an_answer_this_peer_cannot_read_is_an_admission_error_that_says_so(answer, problem):
    coordinator = CannedCoordinator(answer)
    with pytest.raises(MalformedAnswer) as refused:
        coordinator.client.join(JOIN)
    assert isinstance(refused.value, AdmissionError), "the join and the session handle it as a refusal"
    message = str(refused.value)
    assert message.startswith(f"the coordinator at {coordinator.client.base_url} sent an answer to /api/join that this node cannot read")
    assert problem in message, message


def test_a_request_out_of_the_protocol_is_refused_before_it_is_sent():
    with pytest.raises(AdmissionError, match=r"this node's JoinRequest is not valid: email: String should have at most 320 characters"):
        build_request(JoinRequest, peer_id="QmPeer", public_key="a2V5", announce_port=49200, code_version="v", email="a" * 400)


def test_a_heartbeat_is_signed_over_the_exact_bytes_sent():
    coordinator = CannedCoordinator({"expires_at": 1200.0})
    coordinator.client.heartbeat(HEARTBEAT, Signer())
    sent = coordinator.received[0]
    assert sent.url.path == "/api/heartbeat" and json.loads(sent.content)["samples_processed"] == 3
    assert sent.headers[SIGNATURE_HEADER] == base64.b64encode(Signer().sign(sent.content)).decode()


class Identity(Signer):
    peer_id, public_key_protobuf = "QmPeer", b"key"


def test_a_queued_worker_polls_with_its_ticket_until_access_comes():
    coordinator = CannedCoordinator({**QUEUED, "next_poll_seconds": 0.0}, {**QUEUED, "session_token": None, "position": 1,
                                    "next_poll_seconds": 0.0}, ACCESS)
    events = []
    access, weights = admit(coordinator.client, Identity(), WorkerRole(host="127.0.0.1", port=free_port(), wait_timeout=60),
                            events.append)
    assert access == AccessAnswer.model_validate(ACCESS) and weights is None
    polls = [json.loads(request.content) for request in coordinator.received[1:]]
    assert [(p["request_id"], p["session_token"], p["download"]["complete"]) for p in polls] == [("r1", "s1", True)] * 2
    assert [e.position for e in events if isinstance(e, ev.AuthQueued)] == [2, 1]
    assert isinstance(events[-1], ev.AccessGranted) and events[-1].username == "alice"
