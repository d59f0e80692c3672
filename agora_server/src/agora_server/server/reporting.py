"""What a serving worker tells about itself: its WorkerStats, and when it reports.

Every ``stats_interval`` seconds the WorkerStats; every ``progress_interval`` seconds the stats and a
ProgressReport of the window, after which the worker re-announces itself (fresh throughput for the
trainers' balancers). Between reports the health monitor checks whether the worker sits idle.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from agora_server.optim import SwarmProgress
from agora_server.server.averaging_rounds import AveragingRounds
from agora_server.server.backend import StageBackend
from agora_server.server.config import ServerConfig
from agora_server.server.handler import StageServicer
from agora_server.telemetry.contribution import contribution, heartbeat_counters
from agora_server.telemetry.events import Event, ProgressReport, WorkerStats
from agora_server.telemetry.health import HealthMonitor
from agora_server.telemetry.resources import sample_resources


class WorkerReports:
    def __init__(
        self,
        *,
        stage: str,
        peer_id: str,
        device: torch.device,
        config: ServerConfig,
        backend: StageBackend,
        progress: SwarmProgress,
        servicer: StageServicer,
        rounds: AveragingRounds | None,
        online_seconds: Callable[[], float],
        health: HealthMonitor,
        emit: Callable[[Event], None],
        announce: Callable[[], None],
    ):
        self._stage, self._peer_id, self._device, self._config = stage, peer_id, device, config
        self._backend, self._progress, self._servicer, self._rounds = backend, progress, servicer, rounds
        self._online_seconds, self._health, self._emit, self._announce = online_seconds, health, emit, announce
        self.begin()

    def stats(self) -> WorkerStats:
        counters = self._backend.snapshot()
        resources = sample_resources(self._device)
        averager = self._rounds.averager if self._rounds else None
        graphs = self._backend.graphs.snapshot() if self._backend.graphs is not None else None
        return WorkerStats(
            stage=self._stage,
            peer_id=self._peer_id,
            epoch=self._progress.epoch,
            forward_batches=counters.forward_batches,
            backward_batches=counters.backward_batches,
            samples=counters.samples,
            tokens=counters.tokens,
            optimizer_steps=counters.optimizer_steps,
            skipped_steps=counters.skipped_steps,
            throughput=self._backend.throughput(),
            rounds_ok=averager.rounds_ok if averager else 0,
            rounds_failed=averager.rounds_failed if averager else 0,
            last_group_size=averager.last_group_size if averager else 0,
            bytes_received=dict(self._servicer.bytes_received),
            bytes_sent=dict(self._servicer.bytes_sent),
            kept_graph_backwards=counters.kept_graph_backwards,
            recomputed_backwards=counters.recomputed_backwards,
            graphs_held=graphs.held if graphs else 0,
            graph_bytes=graphs.bytes if graphs else 0,
            ram_used_percent=resources.ram_used_percent,
            process_rss_bytes=resources.process_rss_bytes,
            vram_allocated_bytes=resources.vram_allocated_bytes,
            online_seconds=self._online_seconds(),
        )

    def begin(self) -> None:
        """The first report window starts now; the stats are due at the first tick."""
        self._window_start, self._last_report = self._backend.snapshot(), time.monotonic()
        self._last_stats = -float("inf")

    def tick(self) -> None:
        """Report what is due (call about once a second)."""
        interval = self._config.progress_interval
        report_due = time.monotonic() - self._last_report >= interval
        if report_due or time.monotonic() - self._last_stats >= self._config.stats_interval:
            self._last_stats = time.monotonic()
            stats = self.stats()
            self._emit(stats)
        else:
            self._health.check_idle()
        if not report_due:
            return
        self._last_report = time.monotonic()
        now = self._backend.snapshot()
        start = self._window_start
        self._emit(
            ProgressReport(
                stage=self._stage,
                window_seconds=interval,
                forward_batches=now.forward_batches - start.forward_batches,
                backward_batches=now.backward_batches - start.backward_batches,
                total_samples=now.samples,
                contribution_samples=contribution(heartbeat_counters(stats)).samples,
            )
        )
        self._announce()
        self._window_start = now
