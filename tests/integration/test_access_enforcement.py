"""Peers admit only what the coordinator admitted: an outsider can neither write the run's DHT, nor
call a stage, nor join a stage's averaging; an admitted peer can do each."""

from __future__ import annotations

import asyncio
import base64

import httpx
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hivemind import DHT
from hivemind.utils import get_dht_time

from agora.coordinator.signing import load_or_create_key
from agora.membership.identity import ensure_identity
from agora_server.access import PeerAccess
from agora_server.dht_access import AccessRecordValidator
from agora_server.models.config import StageKind
from agora_server.optim.averaging import AveragingConfig
from agora_server.peer_keys import WorkerIdentity
from agora_server.pipeline.directory import read_stage_records
from agora_server.pipeline.remote import StageCaller, StageRefused
from agora_server.wire import Rpc, ServerPhase, StageServerInfo, pack_boundary, stage_key
from tests.helpers.admitted_peers import HOST, access_token, body1_averagers
from tests.helpers.swarms import run_trainer_to_end



def body1_inputs(config):
    tokens = torch.randint(0, config.model.vocab_size, (2, 16))
    return [pack_boundary(torch.randn(2, 16, config.boundary_width), tokens, config.boundary.torch_wire_dtype)]


def test_an_outsider_cannot_announce_itself_or_call_a_stage_until_admitted(swarm_harness, tmp_path):
    # a second data shard: the outsider's key later asks for trainer access while the swarm's trainer holds the first
    swarm = swarm_harness.create({"trainer": {"data_shards": 2}}, steps=12, coordinator=True)
    swarm.start()
    config, run = swarm.config, swarm.config.run_name
    assert run_trainer_to_end(swarm, 300) == 0, "the admitted trainer calls every stage"

    key_path = ensure_identity(tmp_path / "outsider.key")
    coordinator_key = load_or_create_key(swarm.keys_dir / "coordinator.key")
    admitted = WorkerIdentity.load(ensure_identity(tmp_path / "admitted.key"))
    checks = lambda **signer: AccessRecordValidator.for_run(  # noqa: E731
        run, [s.name for s in config.stages], config.server.averaging, swarm.coordinator_public_key, **signer)
    outsider = DHT(initial_peers=swarm.seed_maddrs, host_maddrs=HOST, identity_path=str(key_path), start=True)
    newcomer = DHT(initial_peers=swarm.seed_maddrs, host_maddrs=HOST, identity_path=str(tmp_path / "admitted.key"), start=True,
                   record_validators=[checks(identity=admitted, token=access_token(coordinator_key, admitted, role="worker", stage="body1"))])
    reader = DHT(initial_peers=swarm.seed_maddrs, client_mode=True, start=True, record_validators=[checks()])
    try:
        fake = StageServerInfo(stage="body1", phase=ServerPhase.ONLINE, throughput=1e9, max_batch_size=64, wire_dtype="float32")
        for dht in (outsider, newcomer):
            dht.store(stage_key(run, "body1"), subkey=dht.peer_id.to_base58(), value=fake.to_record(), expiration_time=get_dht_time() + 60)
            dht.shutdown()  # what remains of its record is what the swarm's peers agreed to keep
        announced = asyncio.run(read_stage_records(reader, run, "body1"))
        assert outsider.peer_id.to_base58() not in announced, "the swarm stored an unadmitted peer's announcement"
        assert newcomer.peer_id.to_base58() in announced, "an admitted newcomer's announcement is kept"
        assert len(announced) == 2, "and so is the running worker's"
        worker_id = next(peer for peer in announced if peer != newcomer.peer_id.to_base58())

        caller_dht = DHT(initial_peers=swarm.seed_maddrs, host_maddrs=HOST, client_mode=True, identity_path=str(key_path), start=True)
        try:
            identity = WorkerIdentity.load(key_path)
            someone_else = WorkerIdentity.load(ensure_identity(tmp_path / "trainer-elsewhere.key"))

            async def call(access: PeerAccess | None):
                p2p = await caller_dht.replicate_p2p()
                caller = StageCaller(p2p, run, config.boundary.torch_wire_dtype, config.boundary_width, access=access)
                return await caller.call(worker_id, "body1", StageKind.BODY, Rpc.FORWARD, body1_inputs(config), timeout=60)

            with pytest.raises(StageRefused, match="presented no access token"):
                asyncio.run(call(None))
            key = swarm.coordinator_public_key
            with pytest.raises(StageRefused, match="issued to peer"):  # tokens are public: they travel in DHT records
                asyncio.run(call(PeerAccess(access_token(coordinator_key, someone_else, role="trainer"), key)))
            with pytest.raises(StageRefused, match="needs trainer access"):
                asyncio.run(call(PeerAccess(access_token(coordinator_key, identity, role="worker", stage="body1"), key)))
            with pytest.raises(StageRefused, match="expired"):
                asyncio.run(call(PeerAccess(access_token(coordinator_key, identity, role="trainer", lifetime=-1), key)))
            with pytest.raises(StageRefused, match="signature"):
                asyncio.run(call(PeerAccess(access_token(Ed25519PrivateKey.generate(), identity, role="trainer"), key)))
            granted = _trainer_token_for(swarm, identity)
            (boundary,) = asyncio.run(call(PeerAccess(granted, key)))
            assert boundary.shape[:2] == (2, 16), "with its own trainer access the same peer is served"
        finally:
            caller_dht.shutdown()
    finally:
        for dht in (outsider, newcomer, reader):
            dht.shutdown()
    assert swarm.stop() == []


def _key_body(identity: WorkerIdentity) -> dict:
    return {"peer_id": identity.peer_id, "public_key": base64.b64encode(identity.public_key_protobuf).decode()}


def _trainer_token_for(swarm, identity: WorkerIdentity) -> str:
    answer = httpx.put(f"{swarm.coordinator_url}/api/trainer_access", json=_key_body(identity),
                       headers={"Authorization": f"Bearer {swarm._token}"})
    assert answer.status_code == 200, answer.text
    return answer.json()["access_token"]


def test_a_stage_averages_only_with_workers_admitted_to_it(tmp_path):
    """Three averagers on body1's keys, each with a real token from one coordinator key; the third was
    admitted to head, not body1. Its declarations are refused by the DHT and its join requests by the
    leaders; the two body1 workers average between themselves."""
    config = AveragingConfig(fraction=0.5, average_every=4, matchmaking_time=2.0, averaging_timeout=20.0, request_timeout=1.0)
    with body1_averagers(tmp_path, ["body1", "body1", "head"], config) as (_, averagers, params):
        futures = [averager.maybe_start_round(4, weight=1.0) for averager in averagers]
        results = [future.result(timeout=90) for future in futures]
    assert [(r.ok, r.group_size) for r in results[:2]] == [(True, 2)] * 2, results
    assert not results[2].ok, "a worker of another stage joined body1's round"
    averaged = averagers[0].partition.indices(0, results[0].slice_index)
    for peer in (0, 1):
        assert torch.allclose(params[peer][0][averaged], torch.full((len(averaged),), 1.5)), "(1 + 2) / 2, without the outsider's 3"
    assert torch.equal(params[2][0], torch.full((40,), 3.0))
