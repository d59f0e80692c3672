"""Epochs of a stage: its workers take an optimizer step together each time they have processed,
between them, ``target_batch_size`` samples.

Epochs follow the stage's samples, not its clock: a worker learns of the others' samples a refresh
period late, so an epoch's count usually overshoots its target by the samples processed meanwhile.
Those samples are carried into the next epoch (each worker carries its share of the overshoot), so
that every stage takes one step per ``target_batch_size`` samples however fast its epochs are; without
the carry a stage whose epochs are shorter than the refresh period lost a third of its steps.

``SwarmProgress`` shares the count through hivemind's ProgressTracker (a per-stage record in the
DHT, signed by each peer); ``LocalProgress`` is the same contract for a worker alone (tests,
single-process training).
"""

from __future__ import annotations

import logging
from typing import Protocol

from hivemind import DHT
from hivemind.optim.progress_tracker import ProgressTracker
from hivemind.utils.crypto import RSAPrivateKey

from agora_server.wire import stage_key


class StageProgress(Protocol):
    epoch: int

    def report(self, samples_accumulated: int) -> None:
        """Samples this worker has accumulated towards the current epoch."""

    @property
    def counted(self) -> int:
        """What this worker counts towards the current epoch: its samples, and the carry from the last."""

    def ready(self) -> bool:
        """Whether this worker should step now (the stage reached its target, or moved on)."""

    def advance(self, epoch_total: int | None = None) -> int:
        """Enter the next epoch (or the stage's, if it is further ahead); return it. ``epoch_total``:
        the epoch's count when the workers settled it together (a gradient round), else estimated."""

    def shutdown(self) -> None: ...


class LocalProgress:
    def __init__(self, target_batch_size: int, epoch: int = 0):
        self.target_batch_size, self.epoch, self._samples = target_batch_size, epoch, 0

    def report(self, samples_accumulated: int) -> None:
        self._samples = samples_accumulated

    @property
    def counted(self) -> int:
        return self._samples

    def ready(self) -> bool:
        return self._samples >= self.target_batch_size

    def advance(self, epoch_total: int | None = None) -> int:
        self.epoch, self._samples = self.epoch + 1, 0
        return self.epoch

    def shutdown(self) -> None:
        pass


def overshoot_share(own: int, total: int, target: int) -> int:
    """This worker's part of the samples an epoch counted beyond its target, in proportion to what it
    contributed (every worker that saw the same total carries its share; together, the overshoot)."""
    if total <= target:
        return 0
    return min(own, round(own * (total - target) / total))


def progress_key(run: str, stage: str) -> str:
    """The DHT key of the stage's progress: hivemind's ProgressTracker appends ``_progress`` to its prefix."""
    return f"{stage_key(run, stage)}_progress"


class SwarmProgress:
    def __init__(
        self,
        dht: DHT,
        run: str,
        stage: str,
        target_batch_size: int,
        epoch: int = 0,
        refresh_period: float = 2.0,
        private_key: RSAPrivateKey | None = None,
    ):
        """``private_key`` signs this worker's progress record; hivemind's default is one per process,
        so two workers sharing a process (tests) each need their own."""
        self.tracker = ProgressTracker(
            dht,
            prefix=stage_key(run, stage),
            target_batch_size=target_batch_size,
            min_refresh_period=min(0.5, refresh_period),
            max_refresh_period=refresh_period,
            default_refresh_period=refresh_period,
            status_loglevel=logging.DEBUG,
            private_key=private_key,
            start=True,
        )
        self.epoch = 0
        self._carry = 0  # this worker's share of the last epoch's overshoot, counted towards this one
        self._reported = 0  # this worker's samples of the current epoch, carry included
        # the largest stage count of the current epoch this worker has seen, and its own part in it then:
        # when another worker ends the epoch first, this worker still knows how far past the target it went
        self._seen_total = self._seen_own = 0
        if epoch:
            self.jump_to(epoch)

    def jump_to(self, epoch: int) -> None:
        """Continue from ``epoch`` (a resumed checkpoint, or the state downloaded from a peer)."""
        with self.tracker.pause_updates():
            self.epoch = self.tracker.update_epoch(epoch)
        self._carry = self._reported = self._seen_total = self._seen_own = 0

    @property
    def stage_epoch(self) -> int:
        """The furthest epoch any worker of the stage has announced."""
        return self.tracker.global_epoch

    @property
    def counted(self) -> int:
        return self._reported

    def report(self, samples_accumulated: int) -> None:
        self._reported = self._carry + samples_accumulated
        self.tracker.report_local_progress(self.epoch, self._reported)
        self._observe()

    def ready(self) -> bool:
        # samples only: hivemind's tracker also fires when its estimate of the time to the target runs
        # out, which stepped stages on gradients of a few samples and on clocks that differ per stage
        tracker = self.tracker
        self._observe()
        return tracker.global_epoch > self.epoch or tracker.global_progress.samples_accumulated >= tracker.target_batch_size

    def _observe(self) -> None:
        tracker = self.tracker
        if tracker.global_epoch == self.epoch and tracker.global_progress.samples_accumulated >= self._seen_total:
            self._seen_total, self._seen_own = tracker.global_progress.samples_accumulated, self._reported

    def advance(self, epoch_total: int | None = None) -> int:
        self._observe()
        # else the epoch's count as this worker knows it: the others' part when last seen, its own part now
        total = epoch_total if epoch_total is not None else self._seen_total + self._reported - self._seen_own
        carry = overshoot_share(self._reported, total, self.tracker.target_batch_size)
        with self.tracker.pause_updates():
            self.epoch = self.tracker.update_epoch(max(self.epoch + 1, self.tracker.global_epoch))
        self._carry = self._reported = self._seen_total = self._seen_own = carry
        if carry:  # not while paused: hivemind's rate estimate refuses updates then
            self.tracker.report_local_progress(self.epoch, carry)
        return self.epoch

    def shutdown(self) -> None:
        self.tracker.shutdown()
