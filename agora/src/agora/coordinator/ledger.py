"""The coordinator's database under its one lock: every state change is one transaction, and a single
coordinator process never interleaves two of them (two admissions, say)."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

from sqlalchemy.orm import Session

from agora.coordinator.db import Database


class Ledger:
    def __init__(self, db: Database):
        self.db = db
        self._lock = threading.Lock()

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """Committed when the block ends normally, rolled back on any exception, under the lock."""
        with self._lock, self.db.session() as s:
            yield s

    def read(self):
        """A session without the lock, for reads that no rule depends on (totals, contributions)."""
        return self.db.session()
