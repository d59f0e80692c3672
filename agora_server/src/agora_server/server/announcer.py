"""Keeps a worker's StageServerInfo in the DHT, re-announcing before it expires."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from hivemind import DHT
from hivemind.utils import get_dht_time

from agora_server.wire import StageServerInfo, stage_key

logger = logging.getLogger(__name__)


class StageAnnouncer(threading.Thread):
    """Stores the record every ``period`` seconds with expiry 2×period; ``trigger()`` announces now."""

    def __init__(self, dht: DHT, run: str, peer_id: str, describe: Callable[[], StageServerInfo], period: float):
        super().__init__(name="stage-announcer", daemon=True)
        self.dht, self.run_name, self.peer_id, self.describe, self.period = dht, run, peer_id, describe, period
        self._wake, self._halt = threading.Event(), threading.Event()
        self.announced = threading.Event()
        """Set after the first successful store; tests and the worker wait on it."""

    def trigger(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._halt.set()
        self._wake.set()

    def run(self) -> None:
        while not self._halt.is_set():
            info = self.describe()
            try:
                stored = self.dht.store(
                    stage_key(self.run_name, info.stage),
                    subkey=self.peer_id,
                    value=info.to_record(),
                    expiration_time=get_dht_time() + 2 * self.period,
                )
                if stored:
                    self.announced.set()
                else:
                    logger.warning("DHT refused the announcement of stage %s", info.stage)
            except Exception:
                logger.warning("could not announce stage %s", info.stage, exc_info=True)
            self._wake.wait(self.period)
            self._wake.clear()
