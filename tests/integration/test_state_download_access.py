"""A worker sends its stage's weights only to peers announced on that stage: in a run with a
coordinator the DHT takes such an announcement only from a worker admitted to the stage."""

from __future__ import annotations

import asyncio
import base64
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hivemind import DHT
from hivemind.utils import get_dht_time

from agora.identity import ensure_identity
from agora_server.access import AccessClaims, PeerAccess, encode_public_key, issue_access_token
from agora_server.dht_access import AccessRecordValidator
from agora_server.optim.averaging import AveragingConfig, SpartaAverager
from agora_server.peer_keys import WorkerIdentity
from agora_server.wire import ServerPhase, StageServerInfo, stage_key

HOST = ["/ip4/127.0.0.1/tcp/0"]


def _token(signing_key, identity: WorkerIdentity, stage: str) -> str:
    now = time.time()
    claims = AccessClaims(identity.peer_id, stage, "local-participant", "u-test", now, now + 600, role="worker",
                          public_key=base64.b64encode(identity.public_key_protobuf).decode())
    return issue_access_token(claims, signing_key)


def test_the_stages_weights_go_only_to_peers_announced_on_it(tmp_path, rpc_loop):
    signing = Ed25519PrivateKey.generate()
    public = encode_public_key(signing.public_key())
    config = AveragingConfig(fraction=0.5, average_every=4, matchmaking_time=2.0, averaging_timeout=20.0, request_timeout=1.0)
    dhts, averagers, computes, p2ps = [], [], [], []
    try:
        # the sharer and a newcomer of body1, and a worker of head asking for body1's weights
        for index, stage in enumerate(("body1", "body1", "head")):
            path = ensure_identity(tmp_path / f"peer{index}.key")
            identity = WorkerIdentity.load(path)
            token = _token(signing, identity, stage)
            validator = AccessRecordValidator.for_run("run", ["head", "body1"], config, public, identity=identity, token=token)
            initial = [str(m) for m in dhts[0].get_visible_maddrs()] if dhts else []
            dhts.append(DHT(start=True, host_maddrs=HOST, identity_path=str(path), record_validators=[validator], initial_peers=initial))
            computes.append(ThreadPoolExecutor(max_workers=1))
            averagers.append(SpartaAverager(dhts[-1], stage_key("run", "body1"), [torch.full((40,), float(index))], config,
                                            seed=7, on_compute=computes[-1].submit, access=PeerAccess(token, public), stage="body1"))
        weights = torch.arange(40, dtype=torch.float32)
        averagers[0].share_state(lambda: ({"epoch": 12}, [weights]))

        p2ps.extend(asyncio.run_coroutine_threadsafe(dht.replicate_p2p(), rpc_loop).result(30) for dht in dhts)

        def download(index: int, attempts: int):
            return averagers[index].download_state(p2ps[index], rpc_loop, lambda progress: None, attempts=attempts, pause=0.5)

        outsider = download(2, attempts=2)
        assert outsider is None, "a worker of another stage got body1's weights"
        unannounced = download(1, attempts=2)
        assert unannounced is None, "a peer not announced on the stage got its weights"

        newcomer = dhts[1].peer_id.to_base58()
        info = StageServerInfo(stage="body1", phase=ServerPhase.CATCHING_UP, throughput=0.0, max_batch_size=8, wire_dtype="float32")
        assert dhts[1].store(stage_key("run", "body1"), subkey=newcomer, value=info.to_record(), expiration_time=get_dht_time() + 60)
        state = download(1, attempts=5)
        assert state is not None, "the newcomer announced on the stage got nothing"
        metadata, tensors = state
        assert metadata == {"epoch": 12} and torch.equal(tensors[0], weights)
    finally:
        for p2p in p2ps:
            asyncio.run_coroutine_threadsafe(p2p.shutdown(), rpc_loop).result(30)
        for averager in averagers:
            averager.shutdown()
        for compute in computes:
            compute.shutdown()
        for dht in dhts:
            dht.shutdown()
