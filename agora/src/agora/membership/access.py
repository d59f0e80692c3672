"""What an admitted peer holds: its access to call and be called (``PeerAccess``), and the run's DHT
record validator, which checks everyone's records and signs the peer's own."""

from __future__ import annotations

from typing import TYPE_CHECKING

from agora.protocol import AccessAnswer
from agora_server.access import PeerAccess
from agora_server.peer_keys import WorkerIdentity

if TYPE_CHECKING:
    from agora.config import RunConfig
    from agora_server.dht_access import AccessRecordValidator


def access_for(config: RunConfig, access: AccessAnswer, identity: WorkerIdentity) -> tuple[PeerAccess, AccessRecordValidator]:
    """This peer's PeerAccess and the DHT validator that signs its records and checks everyone's."""
    peer_access = PeerAccess(access.access_token, access.coordinator_public_key, identity)
    return peer_access, run_record_validator(config, access.coordinator_public_key, identity=identity, token=access.access_token)


def run_record_validator(config: RunConfig, coordinator_public_key: str, **signer) -> AccessRecordValidator:
    """The run's DHT validator; ``signer`` (identity, token) for a peer that writes records of its own."""
    from agora_server.dht_access import AccessRecordValidator  # imports hivemind

    stages = [s.name for s in config.stages]
    return AccessRecordValidator.for_run(config.run_name, stages, config.server.averaging, coordinator_public_key, **signer)
