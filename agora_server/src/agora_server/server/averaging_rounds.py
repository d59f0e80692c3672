"""A worker's SPARTA rounds: when one starts and with what weight, how its outcome is reported, and
the snapshot of the stage's weights that newcomers download from this worker."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from hivemind import DHT

from agora_server.access import PeerAccess
from agora_server.optim import SwarmProgress
from agora_server.optim.averaging import STATE_DTYPES, AveragingConfig, RoundResult, SpartaAverager, round_weight_bound
from agora_server.server.backend import StageBackend
from agora_server.server.partners import StagePartners
from agora_server.telemetry.events import AveragingRound, Event
from agora_server.wire import stage_key


class AveragingRounds:
    def __init__(
        self,
        *,
        dht: DHT,
        run: str,
        stage: str,
        seed: int,
        config: AveragingConfig,
        backend: StageBackend,
        progress: SwarmProgress,
        partners: StagePartners,
        compute: ThreadPoolExecutor,
        emit: Callable[[Event], None],
        access: PeerAccess | None,
    ):
        """``compute``: the stage's compute thread, where the weights are read and written."""
        self._stage, self._config, self._backend, self._progress = stage, config, backend, progress
        self._partners, self._compute, self._emit = partners, compute, emit
        self._samples_at_last_round = 0
        self.averager = SpartaAverager(
            dht,
            stage_key(run, stage),
            backend.weights.masters,
            config,
            seed,
            epoch=progress.epoch,
            on_compute=compute.submit,
            on_update=backend.weights.push,
            on_result=self._report_round,
            has_partners=partners.present,
            access=access,
            stage=stage,
            max_weight=round_weight_bound(config, backend.config.target_batch_size),
        )

    def after_epoch(self, epoch: int, contributes: bool) -> None:
        """Start the round ``epoch`` is due for, weighted by the samples trained since the last one;
        ``contributes`` false: a newcomer only receives, its weights are a copy."""
        samples = self._backend.counters.samples
        weight = samples - self._samples_at_last_round if contributes else 0
        if self.averager.maybe_start_round(epoch, weight=weight):
            self._samples_at_last_round = samples

    def share_state(self) -> None:
        """From now on, newcomers may download the stage's weights from this worker."""
        self.averager.share_state(self._current_state)

    def shutdown(self) -> None:
        self.averager.shutdown()

    def _report_round(self, result: RoundResult) -> None:
        # a round that failed while nobody else is announced on the stage had nobody to fail with: the
        # partner has left (its record outlives it a little), so the round is not held against this worker
        partner_online = result.ok or not result.attempted or bool(self._partners.online())
        self._emit(AveragingRound(stage=self._stage, partner_online=partner_online, **dataclasses.asdict(result)))

    def _current_state(self) -> tuple[dict, list]:
        dtype = STATE_DTYPES[self._config.state_dtype]

        def read():
            # a snapshot on the CPU in the served precision (half the copy in bfloat16); the transfer
            # itself runs in the averager's process while this thread goes on computing
            return {"epoch": self._progress.epoch}, [master.detach().to("cpu", dtype, copy=True) for master in self._backend.weights.masters]

        return self._compute.submit(read).result()
