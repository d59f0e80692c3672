"""The asyncio loop, in a thread of its own, that runs a stage's p2p handlers."""

from __future__ import annotations

import asyncio
import threading

from hivemind import DHT
from hivemind.p2p import P2P

from agora_server.server.handler import StageServicer


class HandlerLoop:
    def __init__(self, dht: DHT, servicer: StageServicer, namespace: str):
        self._dht, self._servicer, self._namespace = dht, servicer, namespace
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="p2p-handlers", daemon=True)
        self.p2p: P2P | None = None

    def start(self, timeout: float) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._add_handlers(), self.loop).result(timeout)

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        if self.p2p is not None:
            future = asyncio.run_coroutine_threadsafe(self._remove_handlers(), self.loop)
            try:
                future.result(10)
            except Exception:
                pass  # the daemon may already be gone; nothing left to unregister
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    async def _add_handlers(self) -> None:
        self.p2p = await self._dht.replicate_p2p()
        await self._servicer.add_p2p_handlers(self.p2p, namespace=self._namespace)

    async def _remove_handlers(self) -> None:
        await self._servicer.remove_p2p_handlers(self.p2p, namespace=self._namespace)
        await self.p2p.shutdown()
