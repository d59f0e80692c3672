"""A worker: one stage served over hivemind, announced in the DHT, reporting progress.

Threads: an asyncio loop for p2p handlers (``handler_loop``), one compute thread (the executor) for
the model, the announcer, a thread per periodic checkpoint being written (``checkpoint_writer``), and
the caller's thread, which runs ``serve`` until its stop event is set.
The parts: ``resume`` (which state to start from, the checkpoints), ``averaging_rounds`` (SPARTA),
``warmup`` (joining a running stage), ``reporting`` (stats and progress reports), ``partners`` (the
stage's other workers).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from hivemind import DHT

from agora_server.access import PeerAccess
from agora_server.models import BoundaryConfig, ModelConfig, PipelineStage, StageKind, StageSpec, build_boundary_codec
from agora_server.optim import SwarmProgress
from agora_server.optim.gradient_averaging import GradientAverager
from agora_server.server.announcer import StageAnnouncer
from agora_server.server.averaging_rounds import AveragingRounds
from agora_server.server.backend import StageBackend
from agora_server.server.checkpoint import checkpoint_path
from agora_server.server.checkpoint_writer import CheckpointWriter
from agora_server.server.config import ServerConfig
from agora_server.server.handler import StageServicer
from agora_server.server.handler_loop import HandlerLoop
from agora_server.server.kept_graphs import KeptGraphs
from agora_server.server.memory_plan import kept_graph_bytes_per_token, kept_graphs_budget, plan_stage, with_checkpointing
from agora_server.server.partners import StagePartners
from agora_server.server.reporting import WorkerReports
from agora_server.server.resume import OwnCheckpoint
from agora_server.server.validation import RequestLimits, StageSignature
from agora_server.server.warmup import Warmup
from agora_server.telemetry.events import CheckpointLoaded, EventBus, HealthStop, MemoryPlanned, ServerStarted, ServerStopping, WorkerStats
from agora_server.telemetry.health import HealthMonitor
from agora_server.wire import ServerPhase, StageServerInfo, stage_key


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
        initial_state: Path | None = None,
        on_checkpoint: Callable[[Path, int], None] | None = None,
        access: PeerAccess | None = None,
    ):
        """``initial_state``: the stage's weights from elsewhere (the coordinator's checkpoint), used
        when this identity has no checkpoint of its own. ``on_checkpoint(path, epoch)`` is told of
        every periodic checkpoint once it is on disk (to upload it); it runs on the thread that wrote the
        checkpoint, so it must only queue.
        ``access``: this worker's access in a run with a coordinator; trainers and averaging partners
        must then hold access of their own (the DHT checks records itself, see ``dht_access``)."""
        self.run, self.spec, self.dht, self.events = run, spec, dht, events
        self.device = device
        self.health = HealthMonitor(server.health, events.emit)
        events.subscribe(self.health)
        self.boundary = boundary
        self.server_config = server = self._plan_memory(model, spec, boundary, server, seed, device)
        graphs = None
        if spec.kind is not StageKind.TAIL and server.kept_graphs.max_graphs:
            graphs = KeptGraphs(server.kept_graphs, self._kept_graphs_bytes, kept_graph_bytes_per_token(model, spec, boundary, server, seed))
        # weights are drawn on the CPU in float32 (they become the master weights, or move to the device);
        # the codec's constants are drawn straight onto the device
        codec = build_boundary_codec(boundary, model, seed, device)
        stage = PipelineStage(model, spec, codec, seed, server.precision)
        self.peer_id = dht.peer_id.to_base58()
        self.checkpoint = OwnCheckpoint(checkpoint_path(server.checkpoint_dir, run, spec.name, self.peer_id), initial_state,
                                        spec.name, events.emit)
        self.checkpoint_writer = CheckpointWriter(self.checkpoint, spec.name, events.emit)
        start = self.checkpoint.start
        self.on_checkpoint = on_checkpoint
        # in a run with a coordinator the progress record is signed by this peer's identity: the DHT takes
        # a stage's progress only from the worker whose token it carries
        progress_key = access.identity.hivemind_key() if access is not None and access.identity is not None else None
        self.progress = SwarmProgress(dht, run, spec.name, server.target_batch_size, epoch=self.checkpoint.start_epoch,
                                      private_key=progress_key)
        averaging = server.averaging
        self.partners = StagePartners(dht, run, spec.name, self.peer_id, patience=3 * server.announce_period + averaging.averaging_timeout)
        self.gradient_averager: GradientAverager | None = None
        if averaging.enabled and averaging.gradient_epochs > 0:
            try:
                self.gradient_averager = GradientAverager(
                    dht, stage_key(run, spec.name), [p.shape for p in stage.parameters() if p.requires_grad], averaging,
                    has_partners=self.partners.present, access=access, stage=spec.name,
                )
            except BaseException:
                self.progress.shutdown()
                raise
        self.backend = StageBackend(
            stage, server, device, emit=events.emit, progress=self.progress, after_epoch=self._after_epoch,
            gradients=self.gradient_averager, graphs=graphs,
        )
        self._online_before = self.checkpoint.online_seconds_before
        self._started_at = time.monotonic()
        self._started_wall = time.time()
        if start:
            self.backend.load_state_dict(start.state)
            events.emit(CheckpointLoaded(stage=spec.name, epoch=start.state["epoch"], path=str(start.path), unreadable=start.unreadable))
        signature = StageSignature(
            kind=spec.kind,
            vocab_size=model.vocab_size,
            boundary_width=codec.width,
            limits=RequestLimits(server.max_batch_size, model.max_seq_len, server.max_request_bytes),
        )
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"compute-{spec.name}")
        self.rounds: AveragingRounds | None = None
        if averaging.enabled:
            try:
                self.rounds = AveragingRounds(
                    dht=dht, run=run, stage=spec.name, seed=seed, config=averaging, backend=self.backend, progress=self.progress,
                    partners=self.partners, compute=self._executor, emit=events.emit, access=access,
                )
            except BaseException:
                self.progress.shutdown()  # its thread is already running
                if self.gradient_averager is not None:
                    self.gradient_averager.shutdown()
                raise
        self.servicer = StageServicer(
            run, spec.name, self.backend, signature, self._executor, boundary.torch_wire_dtype, events.emit,
            guard=access.guard if access else None,
        )
        self.announcer = StageAnnouncer(dht, run, self.peer_id, self.describe, server.announce_period)
        self.warmup = Warmup(
            stage=spec.name, rounds=self.rounds, config=averaging, backend=self.backend, progress=self.progress,
            partners=self.partners, resumed=start is not None, compute=self._executor, emit=events.emit,
            announce=self.announcer.trigger,
        )
        self.reports = WorkerReports(
            stage=spec.name, peer_id=self.peer_id, device=device, config=server, backend=self.backend, progress=self.progress,
            servicer=self.servicer, rounds=self.rounds, online_seconds=self.online_seconds, health=self.health,
            emit=events.emit, announce=self.announcer.trigger,
        )
        self.handlers = HandlerLoop(dht, self.servicer, namespace=run)

    def _plan_memory(self, model: ModelConfig, spec: StageSpec, boundary: BoundaryConfig, server: ServerConfig, seed: int, device: torch.device) -> ServerConfig:
        """On a GPU, the memory plan of this stage for this GPU at the largest request it accepts; it
        decides activation checkpointing where the run config leaves it to "auto" (a CPU never checkpoints),
        and the bytes the kept graphs may hold beside the planned peak (``_kept_graphs_bytes``)."""
        self._kept_graphs_bytes = server.kept_graphs.max_bytes
        if device.type != "cuda":
            return with_checkpointing(server, False) if server.precision.activation_checkpointing == "auto" else server
        vram = torch.cuda.get_device_properties(device).total_memory
        plan = plan_stage(model, spec, boundary, server, seed, model.max_seq_len, server.max_batch_size, vram)
        if self._kept_graphs_bytes is None:
            self._kept_graphs_bytes = kept_graphs_budget(plan, vram)
        self.events.emit(MemoryPlanned(
            stage=spec.name, vram_bytes=vram, peak_bytes=plan.device.peak, host_bytes=plan.host.total,
            batch=plan.batch, seq_len=plan.seq_len, checkpointing=plan.checkpointing, max_batch=plan.max_batch,
            kept_graph_bytes=plan.kept_graph, kept_graphs_bytes=self._kept_graphs_bytes,
        ))
        return with_checkpointing(server, plan.checkpointing)

    def _after_epoch(self, epoch: int) -> None:
        every = self.server_config.checkpoint_every
        if epoch % every == 0:
            uploaded = self.on_checkpoint
            self.checkpoint_writer.start(self._checkpoint_state, epoch=epoch, next_try=epoch + every,
                                         then=(lambda: uploaded(self.checkpoint.path, epoch)) if uploaded else None)
        if self.rounds is not None:
            self.rounds.after_epoch(epoch, contributes=self.warmup.phase is not ServerPhase.CATCHING_UP)

    def _checkpoint_state(self) -> dict:
        """The live stage state (call on the compute thread)."""
        return {**self.backend.state_dict(), "online_seconds": self.online_seconds()}

    def _final_checkpoint(self) -> bool:
        """The last checkpoint, on the compute thread once it serves nothing more: after the periodic write in
        progress, if any, and straight from the live state (nothing changes it now, so no copy is needed)."""
        self.checkpoint_writer.wait()
        return self.checkpoint.save(self._checkpoint_state())

    def online_seconds(self) -> float:
        """Time this identity has served, across restarts."""
        return self._online_before + time.monotonic() - self._started_at

    def stats(self) -> WorkerStats:
        return self.reports.stats()

    @property
    def halted(self) -> HealthStop | None:
        """The health rule that stopped this worker, if one did."""
        return self.health.verdict

    def describe(self) -> StageServerInfo:
        return StageServerInfo(
            stage=self.spec.name,
            phase=self.warmup.phase,
            throughput=self.backend.throughput(),
            max_batch_size=self.server_config.max_batch_size,
            wire_dtype=self.boundary.wire_dtype,
            started_at=self._started_wall,
        )

    def start(self, timeout: float = 60.0) -> None:
        self.handlers.start(timeout)
        joining = self.warmup.begin_if_joining()  # announced as catching up: trainers will not route here yet
        self.announcer.start()
        if not self.announcer.announced.wait(timeout):
            raise TimeoutError(f"could not announce stage {self.spec.name} in the DHT within {timeout:.0f}s")
        maddrs = tuple(str(m) for m in self.dht.get_visible_maddrs())
        self.events.emit(ServerStarted(stage=self.spec.name, peer_id=self.peer_id, maddrs=maddrs))
        if joining:
            self.warmup.catch_up(self.handlers.p2p, self.handlers.loop)
        elif self.rounds is not None:
            self.rounds.share_state()

    def serve(self, stop: threading.Event, tick: float = 1.0) -> None:
        """Until ``stop`` is set: step when the stage's epoch ends without a request arriving here,
        and report progress every ``progress_interval`` seconds."""
        self.reports.begin()
        while not stop.wait(tick) and self.halted is None:
            self._executor.submit(self.backend.maybe_step)  # on the compute thread: never beside a backward
            self._executor.submit(self.backend.free_unusable_graphs)
            self.warmup.finish_if_caught_up()
            self.reports.tick()

    def shutdown(self, reason: str = "shutting down") -> None:
        self.events.emit(ServerStopping(stage=self.spec.name, reason=reason))
        self.announcer.stop()
        self.handlers.stop()
        for averaging in (self.rounds, self.gradient_averager):
            if averaging is not None:
                averaging.shutdown()
        self.events.emit(self.stats())  # the final counters, for the last metrics push
        try:
            # no deadline: a production stage's state takes minutes to write, and tests and bench/convergence.py
            # read the checkpoint a stopped worker leaves
            self._executor.submit(self._final_checkpoint).result()
        except Exception:
            pass  # a worker stopping after a crash may not get to save; the periodic checkpoint remains
        self._executor.shutdown(wait=True, cancel_futures=True)
        self.progress.shutdown()
