"""Peers of one run as a coordinator admits them, without the coordinator: access tokens signed with a
coordinator key, and averagers of a stage on DHT nodes that check every record against those tokens."""

from __future__ import annotations

import base64
import contextlib
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hivemind import DHT

from agora.membership.identity import ensure_identity
from agora_server.access import AccessClaims, PeerAccess, encode_public_key, issue_access_token
from agora_server.dht_access import AccessRecordValidator
from agora_server.optim.averaging import AveragingConfig, SpartaAverager
from agora_server.peer_keys import WorkerIdentity
from agora_server.wire import stage_key

HOST = ["/ip4/127.0.0.1/tcp/0"]
RUN, STAGES = "run", ["head", "body1"]


def access_token(signing_key, identity: WorkerIdentity, *, role: str, stage: str = "", lifetime: float = 600) -> str:
    now = time.time()
    claims = AccessClaims(identity.peer_id, stage, "local-participant", "u-test", now, now + lifetime, role=role,
                          public_key=base64.b64encode(identity.public_key_protobuf).decode())
    return issue_access_token(claims, signing_key)


@contextlib.contextmanager
def body1_averagers(tmp_path: Path, admitted_to: list[str], config: AveragingConfig) -> Iterator[tuple[list, list, list]]:
    """One peer per entry of ``admitted_to`` (the stage its worker token names), each averaging body1's
    weights (40 values, all equal to its index + 1) on a DHT that checks records against the run's tokens.
    Yields (dhts, averagers, params); everything is shut down afterwards."""
    signing = Ed25519PrivateKey.generate()
    public = encode_public_key(signing.public_key())
    dhts, averagers, computes, params = [], [], [], []
    try:
        for index, stage in enumerate(admitted_to):
            path = ensure_identity(tmp_path / f"peer{index}.key")
            identity = WorkerIdentity.load(path)
            token = access_token(signing, identity, role="worker", stage=stage)
            validator = AccessRecordValidator.for_run(RUN, STAGES, config, public, identity=identity, token=token)
            initial = [str(m) for m in dhts[0].get_visible_maddrs()] if dhts else []
            dhts.append(DHT(start=True, host_maddrs=HOST, identity_path=str(path), record_validators=[validator], initial_peers=initial))
            computes.append(ThreadPoolExecutor(max_workers=1))
            params.append([torch.full((40,), float(index + 1))])
            averagers.append(SpartaAverager(dhts[-1], stage_key(RUN, "body1"), params[-1], config, seed=7, on_compute=computes[-1].submit,
                                            access=PeerAccess(token, public), stage="body1"))
        yield dhts, averagers, params
    finally:
        for averager in averagers:
            averager.shutdown()
        for compute in computes:
            compute.shutdown()
        for dht in dhts:
            dht.shutdown()
