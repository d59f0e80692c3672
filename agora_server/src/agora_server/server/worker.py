"""A worker: one stage served over hivemind, announced in the DHT, reporting progress.

Threads: an asyncio loop for p2p handlers, one compute thread (the executor) for the model,
the announcer, and the caller's thread, which runs ``serve`` until its stop event is set.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from hivemind import DHT
from hivemind.p2p import P2P

from agora_server.access import PeerAccess
from agora_server.models import BoundaryConfig, ModelConfig, PipelineStage, StageSpec, build_boundary_codec
from agora_server.optim import SwarmProgress
from agora_server.optim.gradient_averaging import GradientAverager
from agora_server.optim.averaging import STATE_DTYPES, RoundResult, SpartaAverager
from agora_server.optim.state_download import DownloadProgress
from agora_server.server.announcer import StageAnnouncer
from agora_server.server.backend import StageBackend
from agora_server.server.checkpoint import CheckpointError, checkpoint_path, read_checkpoint, save_checkpoint
from agora_server.server.config import ServerConfig
from agora_server.server.handler import StageServicer
from agora_server.server.memory_plan import plan_stage, with_checkpointing
from agora_server.server.validation import RequestLimits, StageSignature
from agora_server.telemetry.contribution import contribution, heartbeat_counters
from agora_server.telemetry.events import (
    AveragingRound,
    CheckpointFailed,
    CheckpointLoaded,
    EventBus,
    HealthStop,
    MemoryPlanned,
    ProgressReport,
    ServerStarted,
    ServerStopping,
    StateDownloaded,
    StateDownloadProgress,
    WarmupComplete,
    WarmupStarted,
    WorkerStats,
)
from agora_server.telemetry.health import HealthMonitor
from agora_server.telemetry.resources import sample_resources
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
        every periodic checkpoint (to upload it); it runs on the compute thread, so it must only queue.
        ``access``: this worker's access in a run with a coordinator; trainers and averaging partners
        must then hold access of their own (the DHT checks records itself, see ``dht_access``)."""
        self.run, self.spec, self.dht, self.events = run, spec, dht, events
        self.device = device
        self.health = HealthMonitor(server.health, events.emit)
        events.subscribe(self.health)
        self.boundary = boundary
        self.server_config = server = self._plan_memory(model, spec, boundary, server, seed, device)
        # weights are drawn on the CPU in float32 (they become the master weights, or move to the device);
        # the codec's constants are drawn straight onto the device
        codec = build_boundary_codec(boundary, model, seed, device)
        stage = PipelineStage(model, spec, codec, seed, server.precision)
        self.peer_id = dht.peer_id.to_base58()
        self.checkpoint_file = checkpoint_path(server.checkpoint_dir, run, spec.name, self.peer_id)
        own = read_checkpoint(self.checkpoint_file)
        # a newest file that could not be read is overwritten by the next save instead of being moved
        # over the good .prev it was resumed from
        self._rotate_checkpoint = not (own and own.unreadable)
        shared = read_checkpoint(initial_state) if own is None and initial_state is not None else None
        source = own or shared
        # the download is only needed until this worker has a checkpoint of its own (the disk budget)
        self._superseded = (initial_state,) if shared is not None else ()
        resumed = own.state if own else None
        if shared is not None:
            # the weights, optimizer and epoch of the stage; never another identity's counters
            resumed = {key: shared.state[key] for key in ("model", "optimizer", "epoch")}
        self.on_checkpoint = on_checkpoint
        # in a run with a coordinator the progress record is signed by this peer's identity: the DHT takes
        # a stage's progress only from the worker whose token it carries
        progress_key = access.identity.hivemind_key() if access is not None and access.identity is not None else None
        self.progress = SwarmProgress(dht, run, spec.name, server.target_batch_size, epoch=resumed["epoch"] if resumed else 0,
                                      private_key=progress_key)
        self._partner_seen_at = -float("inf")
        self.gradient_averager: GradientAverager | None = None
        if server.averaging.enabled and server.averaging.gradient_epochs > 0:
            try:
                self.gradient_averager = GradientAverager(
                    dht, stage_key(run, spec.name), [p.shape for p in stage.parameters() if p.requires_grad], server.averaging,
                    has_partners=self._has_partners, access=access, stage=spec.name,
                )
            except BaseException:
                self.progress.shutdown()
                raise
        self.backend = StageBackend(
            stage, server, device, emit=events.emit, progress=self.progress, after_epoch=self._after_epoch,
            gradients=self.gradient_averager,
        )
        self._online_before = float(resumed.get("online_seconds", 0.0)) if resumed else 0.0
        self._started_at = time.monotonic()
        self._started_wall = time.time()
        if source:
            self.backend.load_state_dict(resumed)
            events.emit(CheckpointLoaded(stage=spec.name, epoch=resumed["epoch"], path=str(source.path), unreadable=source.unreadable))
        signature = StageSignature(
            kind=spec.kind,
            vocab_size=model.vocab_size,
            boundary_width=codec.width,
            limits=RequestLimits(server.max_batch_size, model.max_seq_len, server.max_request_bytes),
        )
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"compute-{spec.name}")
        self.averager: SpartaAverager | None = None
        if server.averaging.enabled:
            try:
                self.averager = SpartaAverager(
                    dht,
                    stage_key(run, spec.name),
                    self.backend.weights.masters,
                    server.averaging,
                    seed,
                    epoch=self.progress.epoch,
                    on_compute=self._executor.submit,
                    on_update=self.backend.weights.push,
                    on_result=self._report_round,
                    has_partners=self._has_partners,
                    access=access,
                    stage=spec.name,
                )
            except BaseException:
                self.progress.shutdown()  # its thread is already running
                if self.gradient_averager is not None:
                    self.gradient_averager.shutdown()
                raise
        self._samples_at_last_round = 0
        self.phase = ServerPhase.ONLINE
        self._resumed = resumed is not None
        self._warmup_until_round = 0
        self._warmup_deadline = 0.0
        self.servicer = StageServicer(
            run, spec.name, self.backend, signature, self._executor, boundary.torch_wire_dtype, events.emit,
            guard=access.guard if access else None,
        )
        self.announcer = StageAnnouncer(dht, run, self.peer_id, self.describe, server.announce_period)
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="p2p-handlers", daemon=True)
        self._p2p: P2P | None = None

    def _plan_memory(self, model: ModelConfig, spec: StageSpec, boundary: BoundaryConfig, server: ServerConfig, seed: int, device: torch.device) -> ServerConfig:
        """On a GPU, the memory plan of this stage for this GPU at the largest request it accepts; it
        decides activation checkpointing where the run config leaves it to "auto" (a CPU never checkpoints)."""
        if device.type != "cuda":
            return with_checkpointing(server, False) if server.precision.activation_checkpointing == "auto" else server
        vram = torch.cuda.get_device_properties(device).total_memory
        plan = plan_stage(model, spec, boundary, server, seed, model.max_seq_len, server.max_batch_size, vram)
        self.events.emit(MemoryPlanned(
            stage=spec.name, vram_bytes=vram, peak_bytes=plan.device.peak, host_bytes=plan.host.total,
            batch=plan.batch, seq_len=plan.seq_len, checkpointing=plan.checkpointing, max_batch=plan.max_batch,
        ))
        return with_checkpointing(server, plan.checkpointing)

    def _after_epoch(self, epoch: int) -> None:
        every = self.server_config.checkpoint_every
        if epoch % every == 0 and self.save_checkpoint(next_try=epoch + every) and self.on_checkpoint:
            self.on_checkpoint(self.checkpoint_file, epoch)
        if self.averager is None:
            return
        samples = self.backend.counters.samples
        # a newcomer only receives: its weights are a copy, not a contribution
        weight = 0 if self.phase is ServerPhase.CATCHING_UP else samples - self._samples_at_last_round
        if self.averager.maybe_start_round(epoch, weight=weight):
            self._samples_at_last_round = samples

    def save_checkpoint(self, next_try: int | None = None) -> bool:
        """Write the stage state (call on the compute thread). A failure keeps the last good file and
        is reported, never raised: a full disk must not stop a worker that can still train and serve."""
        state = {**self.backend.state_dict(), "online_seconds": self.online_seconds()}
        try:
            save_checkpoint(self.checkpoint_file, state, rotate=self._rotate_checkpoint, superseded=self._superseded)
        except CheckpointError as e:
            later = f"; training goes on and the next checkpoint is tried at step {next_try}" if next_try else ""
            self.events.emit(CheckpointFailed(stage=self.spec.name, reason=f"{e}{later}"))
            return False
        self._rotate_checkpoint, self._superseded = True, ()
        return True

    def online_seconds(self) -> float:
        """Time this identity has served, across restarts."""
        return self._online_before + time.monotonic() - self._started_at

    def stats(self) -> WorkerStats:
        counters = self.backend.snapshot()
        resources = sample_resources(self.device)
        averager = self.averager
        return WorkerStats(
            stage=self.spec.name,
            peer_id=self.peer_id,
            epoch=self.progress.epoch,
            forward_batches=counters.forward_batches,
            backward_batches=counters.backward_batches,
            samples=counters.samples,
            tokens=counters.tokens,
            optimizer_steps=counters.optimizer_steps,
            skipped_steps=counters.skipped_steps,
            throughput=self.backend.throughput(),
            rounds_ok=averager.rounds_ok if averager else 0,
            rounds_failed=averager.rounds_failed if averager else 0,
            last_group_size=averager.last_group_size if averager else 0,
            bytes_received=dict(self.servicer.bytes_received),
            bytes_sent=dict(self.servicer.bytes_sent),
            ram_used_percent=resources.ram_used_percent,
            process_rss_bytes=resources.process_rss_bytes,
            vram_allocated_bytes=resources.vram_allocated_bytes,
            online_seconds=self.online_seconds(),
        )

    @property
    def halted(self) -> HealthStop | None:
        """The health rule that stopped this worker, if one did."""
        return self.health.verdict

    def _report_round(self, result: RoundResult) -> None:
        # a round that failed while nobody else is announced on the stage had nobody to fail with: the
        # partner has left (its record outlives it a little), so the round is not held against this worker
        partner_online = result.ok or not result.attempted or bool(self._online_peers())
        self.events.emit(AveragingRound(stage=self.spec.name, partner_online=partner_online, **dataclasses.asdict(result)))

    def describe(self) -> StageServerInfo:
        return StageServerInfo(
            stage=self.spec.name,
            phase=self.phase,
            throughput=self.backend.throughput(),
            max_batch_size=self.server_config.max_batch_size,
            wire_dtype=self.boundary.wire_dtype,
            started_at=self._started_wall,
        )

    def start(self, timeout: float = 60.0) -> None:
        self._loop_thread.start()
        asyncio.run_coroutine_threadsafe(self._add_handlers(), self._loop).result(timeout)
        joining = self._joins_a_running_stage()
        if joining:
            self.phase = ServerPhase.CATCHING_UP  # announced as such: trainers will not route here yet
        self.announcer.start()
        if not self.announcer.announced.wait(timeout):
            raise TimeoutError(f"could not announce stage {self.spec.name} in the DHT within {timeout:.0f}s")
        maddrs = tuple(str(m) for m in self.dht.get_visible_maddrs())
        self.events.emit(ServerStarted(stage=self.spec.name, peer_id=self.peer_id, maddrs=maddrs))
        if joining:
            self._catch_up()
        elif self.averager is not None:
            self.averager.share_state(self._current_state)

    def _has_partners(self) -> bool:
        """Whether another worker of the stage is online, or was seen so recently that a missing
        record more likely means a slow DHT read or a late announcement than a departure."""
        now = time.monotonic()
        if self._online_peers():
            self._partner_seen_at = now
        return now - self._partner_seen_at < 3 * self.server_config.announce_period + self.server_config.averaging.averaging_timeout

    def _online_peers(self) -> list[str]:
        """Other workers of this stage announced as online in the DHT."""
        found = self.dht.get(stage_key(self.run, self.spec.name), latest=True)
        return [
            peer for peer, entry in (found.value.items() if found and isinstance(found.value, dict) else ())
            if peer != self.peer_id and isinstance(entry.value, dict) and entry.value.get("phase") == ServerPhase.ONLINE.value
        ]

    def _joins_a_running_stage(self) -> bool:
        """Others already train this stage, and this worker has no state of its own that is current."""
        if not self._online_peers() or self.averager is None or self.progress.stage_epoch == 0:
            return False  # alone, or the stage has not trained yet: nothing to catch up on
        return not self._resumed or self.progress.epoch + self.server_config.averaging.average_every < self.progress.stage_epoch

    def _catch_up(self) -> None:
        """Load the stage's weights from a peer, then average with weight 0 until in step with the others."""
        self.events.emit(WarmupStarted(stage=self.spec.name, stage_epoch=self.progress.stage_epoch))
        self._download_resumed = False
        asked = time.monotonic()
        state = self.averager.download_state(self._p2p, self._loop, self._report_download, attempts=15)
        seconds = time.monotonic() - asked
        if state is not None:
            metadata, tensors = state
            self._executor.submit(self._load_shared_state, metadata, tensors).result()
        self.events.emit(StateDownloaded(stage=self.spec.name, epoch=self.progress.epoch, ok=state is not None,
                                         seconds=round(seconds, 2), resumed=self._download_resumed))
        averaging = self.server_config.averaging
        self._warmup_until_round = self.averager.rounds_ok + averaging.warmup_rounds
        patience = (averaging.warmup_rounds + 2) * (averaging.average_every + 2 * averaging.matchmaking_time + averaging.averaging_timeout)
        self._warmup_deadline = time.monotonic() + patience

    def _report_download(self, progress: DownloadProgress) -> None:
        self._download_resumed = self._download_resumed or progress.resumed_at > 0
        self.events.emit(StateDownloadProgress(stage=self.spec.name, bytes_done=progress.bytes_done, bytes_total=progress.bytes_total,
                                               seconds=progress.seconds, resumed_at=progress.resumed_at))

    def _load_shared_state(self, metadata: dict, tensors: list) -> None:
        masters = self.backend.weights.masters
        if len(tensors) != len(masters) or any(t.shape != p.shape for t, p in zip(tensors, masters)):
            raise ValueError("a peer shared weights of another shape; is it running the same run config?")
        with torch.no_grad():
            for master, value in zip(masters, tensors):
                master.copy_(value)
        self.backend.weights.push()
        self.progress.jump_to(int(metadata["epoch"]))
        self.averager.follow(self.progress.epoch)

    def _current_state(self) -> tuple[dict, list]:
        dtype = STATE_DTYPES[self.server_config.averaging.state_dtype]

        def read():
            # a snapshot on the CPU in the served precision (half the copy in bfloat16); the transfer
            # itself runs in the averager's process while this thread goes on computing
            return {"epoch": self.progress.epoch}, [master.detach().to("cpu", dtype, copy=True) for master in self.backend.weights.masters]

        return self._executor.submit(read).result()

    def _finish_warmup_if_caught_up(self) -> None:
        if self.phase is not ServerPhase.CATCHING_UP:
            return
        caught_up = self.averager.rounds_ok >= self._warmup_until_round
        timed_out = time.monotonic() > self._warmup_deadline
        if not (caught_up or timed_out):
            return
        self.phase = ServerPhase.ONLINE
        self.averager.share_state(self._current_state)
        self.announcer.trigger()
        counters = self.backend.snapshot()
        self.events.emit(
            WarmupComplete(
                stage=self.spec.name,
                epoch=self.progress.epoch,
                requests_served=counters.forward_batches + counters.backward_batches,
                timed_out=timed_out and not caught_up,
            )
        )

    async def _add_handlers(self) -> None:
        self._p2p = await self.dht.replicate_p2p()
        await self.servicer.add_p2p_handlers(self._p2p, namespace=self.run)

    def serve(self, stop: threading.Event, tick: float = 1.0) -> None:
        """Until ``stop`` is set: step when the stage's epoch ends without a request arriving here,
        and report progress every ``progress_interval`` seconds."""
        interval = self.server_config.progress_interval
        last, last_report = self.backend.snapshot(), time.monotonic()
        last_stats = -float("inf")
        while not stop.wait(tick) and self.halted is None:
            self._executor.submit(self.backend.maybe_step)  # on the compute thread: never beside a backward
            self._finish_warmup_if_caught_up()
            report_due = time.monotonic() - last_report >= interval
            if report_due or time.monotonic() - last_stats >= self.server_config.stats_interval:
                last_stats = time.monotonic()
                stats = self.stats()
                self.events.emit(stats)
            else:
                self.health.check_idle()
            if not report_due:
                continue
            last_report = time.monotonic()
            now = self.backend.snapshot()
            self.events.emit(
                ProgressReport(
                    stage=self.spec.name,
                    window_seconds=interval,
                    forward_batches=now.forward_batches - last.forward_batches,
                    backward_batches=now.backward_batches - last.backward_batches,
                    total_samples=now.samples,
                    contribution_samples=contribution(heartbeat_counters(stats)).samples,
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
        for averager in (self.averager, self.gradient_averager):
            if averager is not None:
                averager.shutdown()
        self.events.emit(self.stats())  # the final counters, for the last metrics push
        try:
            self._executor.submit(self.save_checkpoint).result(60)
        except Exception:
            pass  # a worker stopping after a crash may not get to save; the periodic checkpoint remains
        self._executor.shutdown(wait=True, cancel_futures=True)
        self.progress.shutdown()

    async def _remove_handlers(self) -> None:
        await self.servicer.remove_p2p_handlers(self._p2p, namespace=self.run)
        await self._p2p.shutdown()
