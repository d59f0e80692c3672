"""What peers check before they serve, store or average: AccessGuard and the DHT record validator."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.utils.serializer import MSGPackSerializer

from agora_server.access import TRAINER, WORKER, AccessClaims, AccessGuard, AccessTokenError, encode_public_key, issue_access_token
from agora_server.dht_access import AccessRecordValidator
from agora_server.optim.averaging import AveragingConfig, averaging_keys
from agora_server.peer_keys import WorkerIdentity
from tests.helpers.clock import ManualClock

NOW = 1_800_000_000.0


@pytest.fixture(scope="module")
def identities():
    return [WorkerIdentity(rsa.generate_private_key(public_exponent=65537, key_size=2048)) for _ in range(2)]


@pytest.fixture
def coordinator_key():
    return Ed25519PrivateKey.generate()


def token_for(key, identity: WorkerIdentity, *, stage="body1", role=WORKER, expires_at=NOW + 600) -> str:
    claims = AccessClaims(peer_id=identity.peer_id, stage=stage, username="alice", uid="u1", issued_at=NOW, expires_at=expires_at,
                          role=role, public_key=base64.b64encode(identity.public_key_protobuf).decode())
    return issue_access_token(claims, key)


def test_guard_accepts_only_the_peer_the_token_names_in_its_role_and_stage(coordinator_key, identities):
    alice, mallory = identities
    clock = ManualClock(NOW)
    guard = AccessGuard(encode_public_key(coordinator_key.public_key()), clock=clock)
    token = token_for(coordinator_key, alice)
    assert guard.check(token, alice.peer_id, role=WORKER, stage="body1").peer_id == alice.peer_id
    with pytest.raises(AccessTokenError, match="issued to peer"):
        guard.check(token, mallory.peer_id, role=WORKER)  # a copied token names someone else
    with pytest.raises(AccessTokenError, match="needs trainer access"):
        guard.check(token, alice.peer_id, role=TRAINER)
    with pytest.raises(AccessTokenError, match="not 'head'"):
        guard.check(token, alice.peer_id, role=WORKER, stage="head")
    with pytest.raises(AccessTokenError, match="no access token"):
        guard.check("", alice.peer_id, role=WORKER)
    with pytest.raises(AccessTokenError, match="signature"):
        guard.check(token_for(Ed25519PrivateKey.generate(), alice), alice.peer_id, role=WORKER)
    clock.now = NOW + 600  # checked once, cached, and still refused once it runs out
    with pytest.raises(AccessTokenError, match="expired"):
        guard.check(token, alice.peer_id, role=WORKER)


STAGE_KEY = "run.body1"


def validator_for(key, identity=None, token=None, clock=None) -> AccessRecordValidator:
    return AccessRecordValidator.for_run("run", ["head", "body1"], AveragingConfig(fraction=0.25), encode_public_key(key.public_key()), identity=identity, token=token,
                                         clock=clock or ManualClock(NOW))


def record(key: str, subkey: object, value: object, expiration: float = NOW + 60) -> DHTRecord:
    return DHTRecord(DHTID.generate(source=key).to_bytes(), MSGPackSerializer.dumps(subkey), MSGPackSerializer.dumps(value), expiration)


def signed(validator: AccessRecordValidator, rec: DHTRecord) -> DHTRecord:
    return DHTRecord(rec.key, rec.subkey, validator.sign_value(rec), rec.expiration_time)


def test_a_signed_record_passes_and_strips_back_to_its_value(coordinator_key, identities):
    alice = identities[0]
    writer = validator_for(coordinator_key, alice, token_for(coordinator_key, alice))
    reader = validator_for(coordinator_key)  # a seed: checks, signs nothing
    rec = record("run.body1_progress", alice.peer_id, {"samples": 5})
    stored = signed(writer, rec)
    assert reader.validate(stored)
    assert reader.strip_value(stored) == rec.value
    assert reader.sign_value(rec) == rec.value, "a peer without access adds no signature"
    assert not reader.validate(rec), "an unsigned record is refused"


def test_records_that_do_not_carry_their_writers_own_valid_access_are_refused(coordinator_key, identities):
    alice, mallory = identities
    clock = ManualClock(NOW)
    reader = validator_for(coordinator_key, clock=clock)
    alice_token = token_for(coordinator_key, alice)
    rec = record("run.body1_progress", "x", 1)

    copied = validator_for(coordinator_key, mallory, alice_token)  # alice's token lifted from a public record
    assert not reader.validate(signed(copied, rec))
    forged = validator_for(coordinator_key, mallory, token_for(Ed25519PrivateKey.generate(), mallory))
    assert not reader.validate(signed(forged, rec))

    stored = signed(validator_for(coordinator_key, alice, alice_token), rec)
    tampered = DHTRecord(stored.key, stored.subkey, MSGPackSerializer.dumps(2) + stored.value[len(rec.value):], stored.expiration_time)
    assert not reader.validate(tampered), "the signature covers the value"
    extended = DHTRecord(stored.key, stored.subkey, stored.value, stored.expiration_time + 30)
    assert not reader.validate(extended), "and the expiry"
    outliving = signed(validator_for(coordinator_key, alice, alice_token), record("k", "x", 1, expiration=NOW + 600 + 61))
    assert not reader.validate(outliving), "a record may not outlive its writer's access"
    clock.now = NOW + 601
    assert not reader.validate(stored), "once the token expires its records are dropped"
    for garbage in (b"", b"[agora-access:", b"x[agora-access:abc]", b"x[agora-access:abc|!!]"):
        assert not reader.validate(DHTRecord(rec.key, rec.subkey, garbage, rec.expiration_time))


def test_stage_keys_take_only_workers_of_that_stage_announcing_themselves(coordinator_key, identities):
    alice, bob = identities
    reader = validator_for(coordinator_key)
    on_body = validator_for(coordinator_key, alice, token_for(coordinator_key, alice, stage="body1"))
    assert reader.validate(signed(on_body, record(STAGE_KEY, alice.peer_id, "info")))
    assert not reader.validate(signed(on_body, record(STAGE_KEY, bob.peer_id, "info"))), "not under another peer's id"
    assert not reader.validate(signed(on_body, record("run.head", alice.peer_id, "info"))), "not on another stage"
    trainer = validator_for(coordinator_key, bob, token_for(coordinator_key, bob, stage="", role=TRAINER))
    assert not reader.validate(signed(trainer, record(STAGE_KEY, bob.peer_id, "info")))
    assert not reader.validate(signed(trainer, record("run.body1_progress", bob.peer_id, "info")))
    assert reader.validate(signed(trainer, record("run.other", bob.peer_id, "info"))), "other keys take any admitted peer"


def test_it_wraps_hiveminds_own_validators_and_binds_the_stages_averaging_keys(coordinator_key, identities):
    from hivemind.dht.crypto import RSASignatureValidator
    from hivemind.dht.validation import CompositeValidator
    from hivemind.p2p import PeerID

    alice, bob = identities
    token = token_for(coordinator_key, alice)
    # what hivemind's progress tracker adds to a worker's DHT, signing with the worker's own identity
    hivemind_signer = RSASignatureValidator(alice.hivemind_key())
    writer = CompositeValidator([hivemind_signer, validator_for(coordinator_key, alice, token)])
    reader = CompositeValidator([RSASignatureValidator(), validator_for(coordinator_key)])
    progress = record("run.body1_progress", hivemind_signer.local_public_key, {"samples": 3})
    stored = DHTRecord(progress.key, progress.subkey, writer.sign_value(progress), progress.expiration_time)
    assert reader.validate(stored) and reader.strip_value(stored) == progress.value

    keys = averaging_keys("run.body1", AveragingConfig(fraction=0.25))
    assert keys == ["run_body1_sparta.0b00", "run_body1_sparta.0b01", "run_body1_sparta.0b10", "run_body1_sparta.0b11",
                    "run_body1_sparta.all_averagers"]
    own = PeerID.from_base58(alice.peer_id).to_bytes()
    single = validator_for(coordinator_key, alice, token)
    for key in keys:
        assert reader.validate(signed(single, record(key, own, True)))
        assert not reader.validate(signed(single, record(key, PeerID.from_base58(bob.peer_id).to_bytes(), True)))
    head_worker = validator_for(coordinator_key, bob, token_for(coordinator_key, bob, stage="head"))
    assert not reader.validate(signed(head_worker, record(keys[0], PeerID.from_base58(bob.peer_id).to_bytes(), True))), \
        "a worker of another stage cannot look for a group on this one"


def test_an_owned_progress_record_must_name_the_writer_itself(coordinator_key, identities):
    from hivemind.dht.crypto import RSASignatureValidator
    from hivemind.dht.validation import CompositeValidator
    from hivemind.utils.crypto import RSAPrivateKey

    alice, bob = identities
    token = token_for(coordinator_key, alice)
    reader = CompositeValidator([RSASignatureValidator(), validator_for(coordinator_key)])

    def stored_by(signing_key, subkey: bytes) -> DHTRecord:
        writer = CompositeValidator([RSASignatureValidator(signing_key), validator_for(coordinator_key, alice, token)])
        progress = record("run.body1_progress", subkey, {"samples": 3})
        return DHTRecord(progress.key, progress.subkey, writer.sign_value(progress), progress.expiration_time)

    own = RSASignatureValidator(alice.hivemind_key()).local_public_key
    assert reader.validate(stored_by(alice.hivemind_key(), own))
    stranger_key = RSAPrivateKey()  # a key of alice's choosing, not the one her token names
    assert not reader.validate(stored_by(stranger_key, RSASignatureValidator(stranger_key).local_public_key))
    assert not reader.validate(stored_by(bob.hivemind_key(), RSASignatureValidator(bob.hivemind_key()).local_public_key))
    assert not reader.validate(stored_by(alice.hivemind_key(), b"x" + own)), "containing the marker is not enough"
    assert not reader.validate(stored_by(alice.hivemind_key(), b"[owner:anything]"))


def test_a_seed_takes_a_coordinator_key_that_starts_with_a_dash():
    from agora.run_seed import parse_args

    # base64url keys start with "-" one time in 64; the "=" form is how the local swarm and the docs pass them
    args = parse_args(["--identity_path", "seed.key", "--coordinator_public_key=-G_yhUSQjOKpMnFn", "--config", "local-tiny"])
    assert args.coordinator_public_key == "-G_yhUSQjOKpMnFn"
    with pytest.raises(SystemExit):
        parse_args(["--identity_path", "seed.key", "--coordinator_public_key=abc"])  # no --config: refused
