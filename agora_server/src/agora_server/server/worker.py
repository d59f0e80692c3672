"""A worker: one stage served over hivemind, announced in the DHT, reporting progress.

Threads: an asyncio loop for p2p handlers, one compute thread (the executor) for the model,
the announcer, and the caller's thread, which runs ``serve`` until its stop event is set.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
from hivemind import DHT
from hivemind.p2p import P2P

from agora_server.models import BoundaryConfig, ModelConfig, PipelineStage, StageSpec, build_boundary_codec
from agora_server.server.announcer import StageAnnouncer
from agora_server.server.backend import StageBackend
from agora_server.server.config import ServerConfig
from agora_server.server.handler import StageServicer
from agora_server.server.validation import RequestLimits, StageSignature
from agora_server.telemetry.events import EventBus, ProgressReport, ServerStarted, ServerStopping
from agora_server.wire import ServerPhase, StageServerInfo


class StageWorker:
    def __init__(
        self,
        *,
        run: str,
        seed: int,
        model: ModelConfig,
        spec: StageSpec,
        boundary: BoundaryConfig,
        server: ServerConfig,
        dht: DHT,
        device: torch.device,
        events: EventBus,
    ):
        self.run, self.spec, self.server_config, self.dht, self.events = run, spec, server, dht, events
        self.boundary = boundary
        codec = build_boundary_codec(boundary, model, seed)
        stage = PipelineStage(model, spec, codec, seed)
        self.backend = StageBackend(stage, server, device, emit=events.emit)
        signature = StageSignature(
            kind=spec.kind,
            vocab_size=model.vocab_size,
            boundary_width=codec.width,
            limits=RequestLimits(server.max_batch_size, model.max_seq_len, server.max_request_bytes),
        )
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"compute-{spec.name}")
        self.servicer = StageServicer(
            run, spec.name, self.backend, signature, self._executor, boundary.torch_wire_dtype, events.emit
        )
        self.peer_id = dht.peer_id.to_base58()
        self.announcer = StageAnnouncer(dht, run, self.peer_id, self.describe, server.announce_period)
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="p2p-handlers", daemon=True)
        self._p2p: P2P | None = None

    def describe(self) -> StageServerInfo:
        return StageServerInfo(
            stage=self.spec.name,
            phase=ServerPhase.ONLINE,
            throughput=self.backend.throughput(),
            max_batch_size=self.server_config.max_batch_size,
            wire_dtype=self.boundary.wire_dtype,
        )

    def start(self, timeout: float = 60.0) -> None:
        self._loop_thread.start()
        asyncio.run_coroutine_threadsafe(self._add_handlers(), self._loop).result(timeout)
        self.announcer.start()
        if not self.announcer.announced.wait(timeout):
            raise TimeoutError(f"could not announce stage {self.spec.name} in the DHT within {timeout:.0f}s")
        maddrs = tuple(str(m) for m in self.dht.get_visible_maddrs())
        self.events.emit(ServerStarted(stage=self.spec.name, peer_id=self.peer_id, maddrs=maddrs))

    async def _add_handlers(self) -> None:
        self._p2p = await self.dht.replicate_p2p()
        await self.servicer.add_p2p_handlers(self._p2p, namespace=self.run)

    def serve(self, stop: threading.Event) -> None:
        """Report progress every ``progress_interval`` seconds until ``stop`` is set."""
        interval = self.server_config.progress_interval
        last = self.backend.snapshot()
        while not stop.wait(interval):
            now = self.backend.snapshot()
            self.events.emit(
                ProgressReport(
                    stage=self.spec.name,
                    window_seconds=interval,
                    forward_batches=now.forward_batches - last.forward_batches,
                    backward_batches=now.backward_batches - last.backward_batches,
                    total_samples=now.samples,
                )
            )
            self.announcer.trigger()  # fresh throughput for the trainers' balancers
            last = now

    def shutdown(self, reason: str = "shutting down") -> None:
        self.events.emit(ServerStopping(stage=self.spec.name, reason=reason))
        self.announcer.stop()
        if self._loop_thread.is_alive():
            if self._p2p is not None:
                future = asyncio.run_coroutine_threadsafe(self._remove_handlers(), self._loop)
                try:
                    future.result(10)
                except Exception:
                    pass  # the daemon may already be gone; nothing left to unregister
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop_thread.join(10)
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def _remove_handlers(self) -> None:
        await self.servicer.remove_p2p_handlers(self._p2p, namespace=self.run)
        await self._p2p.shutdown()
