"""The coordinator's parts on their own: config, token file, keys, queue arithmetic, stage choice, port test."""

from __future__ import annotations

import base64
import socket
import stat

import pytest
import yaml

from agora.coordinator import assignment, queue
from agora.coordinator.config import CoordinatorConfigError, load_coordinator_config
from agora_server.peer_keys import WorkerIdentity, verify_signature
from agora.coordinator.porttest import probe
from agora.membership.port_test import PortTestListener
from agora.coordinator.signing import load_or_create_key
from agora.coordinator.tokens import HuggingFaceVerifier, InvalidToken, TokenFileVerifier, TokenServiceUnavailable, add_token
from tests.helpers.fake_whoami import FakeWhoami


RUN = {"run_config": "local-tiny"}


def test_config_from_yaml_with_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    stages = [{"name": "head", "need": 3}, {"name": "body1"}, {"name": "tail"}]
    path.write_text(yaml.safe_dump({**RUN, "stages": stages, "queue": {"capacity": 5}}))
    config = load_coordinator_config(path, {"port": 9100, "database_url": None})
    assert [(s.name, s.need) for s in config.stages] == [("head", 3), ("body1", 1), ("tail", 1)]
    assert (config.queue.capacity, config.port, config.database_url) == (5, 9100, "sqlite:///coordinator.db")
    assert str(config.token_source) == "hf"


@pytest.mark.parametrize("bad", [{"port": 9100}, {**RUN, "queue": {"capacity": 0}}, {**RUN, "stages": [{"name": "head", "need": 0}]},
                                 {**RUN, "checkpoint_url_template": "http://x/no-stage"}, {**RUN, "unknown_field": 1},
                                 {**RUN, "checkpoint_url_template": "http://x/{stage}", "checkpoints": {"directory": "ckpt"}}])
def test_config_errors_name_the_file(tmp_path, bad):
    """``{"port": 9100}``: no run config named, so no stages to admit to."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(CoordinatorConfigError, match="c.yaml"):
        load_coordinator_config(path)


def test_token_file_keeps_digests_only_and_is_private(tmp_path):
    path = tmp_path / "tokens.txt"
    token = add_token(path, "alice")
    assert token not in path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    verifier = TokenFileVerifier(path)
    assert verifier.username(token) == "alice"
    with pytest.raises(InvalidToken):
        verifier.username(token + "x")
    with pytest.raises(InvalidToken) as info:
        verifier.username("wrong-secret")
    assert "wrong-secret" not in repr(info.value) + str(info.value)


def test_hugging_face_verifier_through_huggingface_hub():
    whoami = FakeWhoami({"hf_known": "alice"})
    try:
        verifier = HuggingFaceVerifier(endpoint=whoami.url)
        assert verifier.username("hf_known") == "alice"
        with pytest.raises(InvalidToken) as info:
            verifier.username("hf_unknown")
        assert "hf_unknown" not in str(info.value)
    finally:
        whoami.close()
    with pytest.raises(TokenServiceUnavailable):  # the Hub unreachable is not the participant's fault
        verifier.username("hf_known")


def test_signing_key_is_private_and_stable(tmp_path):
    path = tmp_path / "keys" / "coordinator.key"
    first = load_or_create_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.chmod(0o644)
    again = load_or_create_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert again.public_key().public_bytes_raw() == first.public_key().public_bytes_raw()


def test_worker_identity_matches_hivemind(tmp_path):
    """Keys made by hivemind's own generate_identity give the same peer id and signatures hivemind accepts."""
    from hivemind.p2p import P2P
    from hivemind.p2p.p2p_daemon_bindings.datastructures import PeerID
    from hivemind.utils.crypto import RSAPublicKey

    path = tmp_path / "private.key"
    P2P.generate_identity(str(path))
    identity = WorkerIdentity.load(path)
    assert identity.peer_id == PeerID.from_identity(path.read_bytes()).to_base58()
    signature = identity.sign(b"heartbeat body")
    assert verify_signature(identity.public_key_protobuf, b"heartbeat body", signature)
    assert not verify_signature(identity.public_key_protobuf, b"heartbeat bodY", signature)
    hivemind_key = RSAPublicKey(identity._key.public_key())
    assert hivemind_key.verify(b"heartbeat body", base64.b64encode(signature))


def test_queue_arithmetic():
    waiting = [queue.Waiting("a", False), queue.Waiting("b", True), queue.Waiting("c", True)]
    assert queue.pick_admissions(waiting, free=1, joins_paused=False) == ["b"]
    assert queue.pick_admissions(waiting, free=5, joins_paused=True) == []
    assert queue.departure_interval([100.0]) is None, "one departure is no rate"
    assert queue.departure_interval([10.0, 70.0, 40.0]) == 30
    assert queue.departure_interval([5.0, 5.0]) is None
    assert queue.estimated_wait_s(3, 30, joins_paused=False) == 90
    assert queue.estimated_wait_s(3, 30, joins_paused=True) is None
    assert queue.estimated_wait_s(3, None, joins_paused=False) is None
    assert queue.next_poll_s(4.2, 10) == 5 and queue.next_poll_s(600, 10) == 10 and queue.next_poll_s(0, 10) == 1


def test_stage_choice_with_hysteresis():
    needs = {"head": 2, "body1": 2, "tail": 2}
    assert assignment.choose_stage(needs, {"head": 1, "body1": 0, "tail": 1}, None, 0.25) == "body1"
    # head is 0.5 filled vs body1's 0: a returning head node leaves for body1 only beyond the margin
    assert assignment.choose_stage(needs, {"head": 1, "body1": 0, "tail": 1}, "head", 0.25) == "body1"
    assert assignment.choose_stage(needs, {"head": 1, "body1": 0, "tail": 1}, "head", 0.5) == "head"
    assert assignment.choose_stage(needs, {}, None, 0.25) == "head", "ties go to the earlier stage"


def test_move_takes_the_newest_worker_of_the_fullest_stage():
    needs = {"head": 1, "body1": 1, "tail": 1}
    nodes = [assignment.NodeOnStage("h1", "head", 1.0), assignment.NodeOnStage("h2", "head", 5.0),
             assignment.NodeOnStage("b1", "body1", 2.0)]
    assert assignment.choose_move(needs, nodes) == assignment.Move("h2", "head", "tail")
    assert assignment.choose_move(needs, nodes[:1] + nodes[2:]) is None, "no stage can spare a worker"
    assert assignment.choose_move(needs, nodes + [assignment.NodeOnStage("t1", "tail", 3.0)]) is None


def test_port_probe_needs_our_listener_to_answer():
    with PortTestListener("127.0.0.1", 0) as listener:
        assert probe("127.0.0.1", listener.port, 2.0)
    with socket.socket() as silent:  # something holds the port but never answers: fails at the deadline
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        assert not probe("127.0.0.1", silent.getsockname()[1], 0.3)
    assert not probe("127.0.0.1", listener.port, 0.3), "a closed listener must not answer"
