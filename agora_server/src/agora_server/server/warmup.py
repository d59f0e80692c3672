"""The warm-up of a worker that joins a stage others already train.

    ONLINE ──(others train the stage, this worker's state is not current)──> CATCHING_UP
    CATCHING_UP: announced as such (trainers do not route here), downloads the stage's weights from
                 a peer, then averages with weight 0
    CATCHING_UP ──(warmup_rounds rounds went through, or their patience ran out)──> ONLINE
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from hivemind.p2p import P2P

from agora_server.optim import SwarmProgress
from agora_server.optim.averaging import AveragingConfig
from agora_server.optim.state_download import DownloadProgress
from agora_server.server.averaging_rounds import AveragingRounds
from agora_server.server.backend import StageBackend
from agora_server.server.partners import StagePartners
from agora_server.telemetry.events import Event, StateDownloaded, StateDownloadProgress, WarmupComplete, WarmupStarted
from agora_server.wire import ServerPhase


class Warmup:
    def __init__(
        self,
        *,
        stage: str,
        rounds: AveragingRounds | None,
        config: AveragingConfig,
        backend: StageBackend,
        progress: SwarmProgress,
        partners: StagePartners,
        resumed: bool,
        compute: ThreadPoolExecutor,
        emit: Callable[[Event], None],
        announce: Callable[[], None],
    ):
        """``rounds``: None where the worker does not average (it never warms up); ``resumed``: it
        starts from a state of its own or from elsewhere; ``announce``: re-announce the worker now."""
        self._stage, self._rounds, self._config, self._backend, self._progress = stage, rounds, config, backend, progress
        self._partners, self._resumed, self._compute, self._emit, self._announce = partners, resumed, compute, emit, announce
        self.phase = ServerPhase.ONLINE
        self._until_round = 0
        self._deadline = 0.0
        self._download_resumed = False

    def begin_if_joining(self) -> bool:
        """Enter CATCHING_UP (before the first announcement) if the worker joins a running stage."""
        if self._joins_a_running_stage():
            self.phase = ServerPhase.CATCHING_UP
        return self.phase is ServerPhase.CATCHING_UP

    def _joins_a_running_stage(self) -> bool:
        """Others already train this stage, and this worker has no state of its own that is current."""
        if not self._partners.online() or self._rounds is None or self._progress.stage_epoch == 0:
            return False  # alone, or the stage has not trained yet: nothing to catch up on
        return not self._resumed or self._progress.epoch + self._config.average_every < self._progress.stage_epoch

    def catch_up(self, p2p: P2P, loop: asyncio.AbstractEventLoop) -> None:
        """Load the stage's weights from a peer (read through ``p2p`` on the handlers' ``loop``), then
        average with weight 0 until in step with the others."""
        self._emit(WarmupStarted(stage=self._stage, stage_epoch=self._progress.stage_epoch))
        self._download_resumed = False
        asked = time.monotonic()
        averager = self._rounds.averager
        state = averager.download_state(p2p, loop, self._report_download, attempts=15)
        seconds = time.monotonic() - asked
        if state is not None:
            metadata, tensors = state
            self._compute.submit(self._load_shared_state, metadata, tensors).result()
        self._emit(StateDownloaded(stage=self._stage, epoch=self._progress.epoch, ok=state is not None,
                                   seconds=round(seconds, 2), resumed=self._download_resumed))
        config = self._config
        self._until_round = averager.rounds_ok + config.warmup_rounds
        patience = (config.warmup_rounds + 2) * (config.average_every + 2 * config.matchmaking_time + config.averaging_timeout)
        self._deadline = time.monotonic() + patience

    def finish_if_caught_up(self) -> None:
        if self.phase is not ServerPhase.CATCHING_UP:
            return
        caught_up = self._rounds.averager.rounds_ok >= self._until_round
        timed_out = time.monotonic() > self._deadline
        if not (caught_up or timed_out):
            return
        self.phase = ServerPhase.ONLINE
        self._rounds.share_state()
        self._announce()
        counters = self._backend.snapshot()
        self._emit(
            WarmupComplete(
                stage=self._stage,
                epoch=self._progress.epoch,
                requests_served=counters.forward_batches + counters.backward_batches,
                timed_out=timed_out and not caught_up,
            )
        )

    def _report_download(self, progress: DownloadProgress) -> None:
        self._download_resumed = self._download_resumed or progress.resumed_at > 0
        self._emit(StateDownloadProgress(stage=self._stage, bytes_done=progress.bytes_done, bytes_total=progress.bytes_total,
                                         seconds=progress.seconds, resumed_at=progress.resumed_at))

    def _load_shared_state(self, metadata: dict, tensors: list) -> None:
        masters = self._backend.weights.masters
        if len(tensors) != len(masters) or any(t.shape != p.shape for t, p in zip(tensors, masters)):
            raise ValueError("a peer shared weights of another shape; is it running the same run config?")
        with torch.no_grad():
            for master, value in zip(masters, tensors):
                master.copy_(value)
        self._backend.weights.push()
        self._progress.jump_to(int(metadata["epoch"]))
        self._rounds.averager.follow(self._progress.epoch)
