"""Reads which workers serve each stage from the DHT."""

from __future__ import annotations

import logging

from hivemind import DHT

from agora_server.wire import StageServerInfo, stage_key

logger = logging.getLogger(__name__)


async def read_stage_records(dht: DHT, run: str, stage: str) -> dict[str, StageServerInfo]:
    """Live announcements of one stage, by peer id; malformed records are skipped."""
    found = await dht.get(stage_key(run, stage), latest=True, return_future=True)
    if found is None or not isinstance(found.value, dict):
        return {}
    records = {}
    for subkey, entry in found.value.items():
        try:
            records[str(subkey)] = StageServerInfo.from_record(entry.value)
        except (KeyError, TypeError, ValueError):
            logger.debug("skipping a malformed record under %s", stage_key(run, stage))
    return records
