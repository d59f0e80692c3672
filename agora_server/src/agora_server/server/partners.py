"""The other workers of this worker's stage, as their announcements in the DHT show them."""

from __future__ import annotations

import time

from hivemind import DHT

from agora_server.wire import ServerPhase, stage_key


class StagePartners:
    def __init__(self, dht: DHT, run: str, stage: str, peer_id: str, patience: float):
        """``patience``: seconds a partner last seen online still counts as present."""
        self._dht, self._key, self._peer_id, self._patience = dht, stage_key(run, stage), peer_id, patience
        self._seen_at = -float("inf")

    def online(self) -> list[str]:
        """Other workers of this stage announced as online in the DHT."""
        found = self._dht.get(self._key, latest=True)
        return [
            peer for peer, entry in (found.value.items() if found and isinstance(found.value, dict) else ())
            if peer != self._peer_id and isinstance(entry.value, dict) and entry.value.get("phase") == ServerPhase.ONLINE.value
        ]

    def present(self) -> bool:
        """Whether another worker of the stage is online, or was seen so recently that a missing
        record more likely means a slow DHT read or a late announcement than a departure."""
        now = time.monotonic()
        if self.online():
            self._seen_at = now
        return now - self._seen_at < self._patience
