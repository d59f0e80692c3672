"""Which shard of the run's data each trainer reads: given when a trainer identity first asks for
access, given back to the same identity on every renewal and restart (its saved data position names
that shard), and handed to another trainer only once the holder's access has lapsed.

A trainer beyond the shards is refused rather than kept waiting: an operator who starts one trainer
too many learns it at once and either stops one or raises ``trainer.data_shards``."""

from __future__ import annotations

import time
from typing import Callable

from sqlalchemy import select
from sqlalchemy.orm import Session

from agora.coordinator.db import TrainerShard
from agora.coordinator.errors import CoordinatorRefusal, Refusal
from agora.coordinator.ledger import Ledger
from agora.protocol import AccessAnswer


class TrainerShards:
    def __init__(self, shards: int, ledger: Ledger, clock: Callable[[], float]):
        self.shards, self._ledger, self._clock = shards, ledger, clock

    def assign(self, access: AccessAnswer) -> AccessAnswer:
        """``access`` (a trainer's, just granted) with its data shard; a refusal if every shard is held."""
        with self._ledger.transaction() as s:
            now = self._clock()
            held = s.scalar(select(TrainerShard).where(TrainerShard.peer_id == access.peer_id))
            if held is not None and held.rank >= self.shards:  # the run now has fewer shards: this one is gone
                s.delete(held)
                s.flush()
                held = None
            if held is None:
                held = self._free_shard(s, now)
                held.peer_id = access.peer_id
            held.expires_at = access.expires_at
            return access.model_copy(update={"data_shard": held.rank, "data_shards": self.shards})

    def _free_shard(self, s: Session, now: float) -> TrainerShard:
        """The lowest shard nobody holds, else the lowest whose trainer's access has lapsed."""
        rows = {row.rank: row for row in s.scalars(select(TrainerShard).where(TrainerShard.rank < self.shards))}
        for rank in range(self.shards):
            if rank not in rows:
                row = TrainerShard(rank=rank)
                s.add(row)
                return row
        lapsed = [row for row in rows.values() if row.expires_at <= now]
        if lapsed:
            return min(lapsed, key=lambda row: row.rank)
        free_at = time.strftime("%H:%M:%S UTC", time.gmtime(min(row.expires_at for row in rows.values())))
        raise CoordinatorRefusal(Refusal.NO_DATA_SHARD, shards=self.shards, free_at=free_at)
