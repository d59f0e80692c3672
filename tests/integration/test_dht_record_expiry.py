"""A record whose writer's access lapsed is dropped alone: the live records under the same DHT key
(a stage's other workers) stay readable (issue 16: one lapsed record used to hide them for ~30 s)."""

from __future__ import annotations

import asyncio
import time

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hivemind import DHT
from hivemind.utils import get_dht_time

from agora.membership.identity import ensure_identity
from agora_server.access import encode_public_key
from agora_server.dht_access import AccessRecordValidator
from agora_server.optim.averaging import AveragingConfig
from agora_server.peer_keys import WorkerIdentity
from agora_server.pipeline.directory import read_stage_records
from agora_server.wire import ServerPhase, StageServerInfo, stage_key
from tests.helpers.admitted_peers import HOST, RUN, STAGES, access_token

LAPSING_TOKEN_SECONDS = 4.0


def test_a_record_whose_token_lapsed_does_not_hide_the_live_ones(tmp_path):
    signing = Ed25519PrivateKey.generate()
    public = encode_public_key(signing.public_key())
    validator = lambda **signer: AccessRecordValidator.for_run(RUN, STAGES, AveragingConfig(), public, **signer)  # noqa: E731
    record = StageServerInfo(stage="body1", phase=ServerPhase.ONLINE, throughput=10.0, max_batch_size=8, wire_dtype="float32").to_record()
    dhts: list[DHT] = []
    try:
        writers = {}
        for name, lifetime in (("live", 600.0), ("lapsing", LAPSING_TOKEN_SECONDS)):
            path = ensure_identity(tmp_path / f"{name}.key")
            identity = WorkerIdentity.load(path)
            token = access_token(signing, identity, role="worker", stage="body1", lifetime=lifetime)
            initial = [str(m) for m in dhts[0].get_visible_maddrs()] if dhts else []
            dhts.append(DHT(start=True, host_maddrs=HOST, identity_path=str(path), initial_peers=initial,
                            record_validators=[validator(identity=identity, token=token)]))
            writers[name] = dhts[-1]
        lapses_at = time.time() + LAPSING_TOKEN_SECONDS
        for dht in writers.values():
            # 30 s: within the validator's grace past the lapsing token, so the swarm stores it
            assert dht.store(stage_key(RUN, "body1"), subkey=dht.peer_id.to_base58(), value=record,
                             expiration_time=get_dht_time() + 30)

        def read() -> dict:  # a new reader each time: what it reads then comes from the swarm, not its cache
            dhts.append(DHT(start=True, client_mode=True, initial_peers=[str(m) for m in dhts[0].get_visible_maddrs()],
                            record_validators=[validator()]))
            return asyncio.run(read_stage_records(dhts[-1], RUN, "body1"))

        live, lapsing = (writers[name].peer_id.to_base58() for name in ("live", "lapsing"))
        assert set(read()) == {live, lapsing}

        time.sleep(max(0.0, lapses_at - time.time()) + 0.5)  # the token's lapse is a time, not an event
        announced = read()
        assert lapsing not in announced, "a record whose writer's access lapsed was still read"
        assert live in announced, "the lapsed record hid the live one under the same key"
    finally:
        for dht in dhts:
            dht.shutdown()
