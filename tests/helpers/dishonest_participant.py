"""An admitted participant who uses its access dishonestly, against a running coordinator and swarm:
its node joins through the real join (port test, queue), then forges heartbeats, uploads junk as its
stage's checkpoint, announces itself on its stage and opens many weight downloads at once. Shared by
the tests (the refusing worker joins with it) and ``bench/abuse.py``, which runs each as an attack."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
import time
from pathlib import Path

from hivemind import DHT
from hivemind.p2p import P2P, PeerID
from hivemind.utils import get_dht_time

from agora.config import RunConfig
from agora.membership.access import access_for
from agora.membership.client import AdmissionError, CoordinatorClient
from agora.membership.identity import ensure_identity
from agora.membership.join import WorkerRole, admit
from agora.ports import free_port
from agora.protocol import AccessAnswer, HeartbeatRequest
from agora_server.dht_access import AccessRecordValidator
from agora_server.peer_keys import WorkerIdentity
from agora_server.wire import ServerPhase, StageServerInfo, stage_key

HOST = "127.0.0.1"
LARGEST_CLAIM = 2**53
"""The largest count a heartbeat may carry (the protocol refuses more)."""


@dataclasses.dataclass
class AdmittedNode:
    identity: WorkerIdentity
    access: AccessAnswer
    client: CoordinatorClient
    validator: AccessRecordValidator
    """Signs this node's DHT records with its access token, checks everyone's."""

    @property
    def stage(self) -> str:
        return self.access.stage

    def close(self) -> None:
        self.client.close()


def admit_node(config: RunConfig, coordinator_url: str, token: str, identity_path: Path, wait_timeout: float = 60.0) -> AdmittedNode:
    """A node of the participant whose ``token`` this is, admitted to the stage the coordinator picks."""
    identity = WorkerIdentity.load(ensure_identity(identity_path))
    client = CoordinatorClient(coordinator_url, token)
    try:
        role = WorkerRole(host=HOST, port=free_port(HOST), wait_timeout=wait_timeout)
        access, _ = admit(client, identity, role, emit=lambda event: None)
    except AdmissionError:
        client.close()
        raise
    _, validator = access_for(config, access, identity)
    return AdmittedNode(identity, access, client, validator)


def forge_heartbeats(node: AdmittedNode, sessions: int = 3) -> int:
    """Heartbeats that claim the largest counts, each under a new session (a restart, whose totals
    start again from zero); what they claimed in all."""
    for _ in range(sessions):
        request = HeartbeatRequest(peer_id=node.identity.peer_id, uid=node.access.uid, sent_at=time.time(),
                                   session=secrets.token_hex(8), samples_processed=LARGEST_CLAIM, tokens_processed=LARGEST_CLAIM)
        node.client.heartbeat(request, node.identity)
    return sessions * LARGEST_CLAIM


def upload_checkpoint(node: AdmittedNode, content: bytes, epoch: int = 0) -> str | None:
    """Offer ``content`` as the node's stage checkpoint: None if the coordinator took it, else its refusal."""
    try:
        node.client.upload_checkpoint(node.stage, [content], size=len(content), epoch=epoch, access_token=node.access.access_token)
    except AdmissionError as e:
        return str(e)
    return None


def start_dht(node: AdmittedNode, identity_path: Path, initial_peers: list[str]) -> DHT:
    """The node's DHT peer, under its identity, signing its records with its access."""
    return DHT(start=True, host_maddrs=[f"/ip4/{HOST}/tcp/0"], identity_path=str(identity_path),
               record_validators=[node.validator], initial_peers=initial_peers)


def announce(dht: DHT, run: str, stage: str, phase: ServerPhase = ServerPhase.CATCHING_UP,
             throughput: float = 0.0, lifetime: float = 60.0) -> bool:
    """Announce this DHT's peer as a worker of ``stage`` (catching up: trainers do not route to it)."""
    info = StageServerInfo(stage=stage, phase=phase, throughput=throughput, max_batch_size=8, wire_dtype="float32")
    return dht.store(stage_key(run, stage), subkey=dht.peer_id.to_base58(), value=info.to_record(),
                     expiration_time=get_dht_time() + lifetime)


async def open_state_downloads(p2p: P2P, peer: PeerID, stage_prefix: str, count: int, hold: float) -> int:
    """Open ``count`` downloads of a stage's weights from ``peer`` at once and keep them open for
    ``hold`` seconds, reading only their first message; how many were served (the rest got nothing)."""
    from agora_server.optim.averaging import _StageStateAverager, averager_prefix
    from agora_server.optim.state_download import ResumePoint

    stub = _StageStateAverager.get_stub(p2p, peer, namespace=averager_prefix(stage_prefix))

    async def first_message(stream) -> bool:
        try:
            await stream.__anext__()
            return True
        except Exception:  # nothing (StopAsyncIteration), or the peer's error: not served either way
            return False

    streams = [(await stub.rpc_download_state_from(ResumePoint().to_message())).__aiter__() for _ in range(count)]
    try:
        served = await asyncio.gather(*(first_message(stream) for stream in streams))
        await asyncio.sleep(hold)
    finally:
        for stream in streams:
            with contextlib.suppress(Exception):
                await stream.aclose()
    return sum(served)
