"""Epochs of a stage: its workers take an optimizer step together each time they have processed,
between them, ``target_batch_size`` samples.

Epochs follow the stage's samples, not its clock: a worker learns of the others' samples a refresh
period late, so an epoch's count usually overshoots its target by the samples processed meanwhile.
Those samples are carried into the next epoch (each worker carries its share of the overshoot), so
that every stage takes one step per ``target_batch_size`` samples however fast its epochs are; without
the carry a stage whose epochs are shorter than the refresh period lost a third of its steps.

``SwarmProgress`` shares the count through hivemind's ProgressTracker (a per-stage record in the
DHT, signed by each peer), believing the other workers' records only as far as progress_bounds
allows; ``LocalProgress`` is the same contract for a worker alone (tests, single-process training).
"""

from __future__ import annotations

import logging
from typing import Protocol

from hivemind import DHT
from hivemind.optim.progress_tracker import GlobalTrainingProgress, ProgressTracker
from hivemind.utils import ValueWithExpiration
from hivemind.utils.crypto import RSAPrivateKey

from agora_server.optim.progress_bounds import EpochCredit, bounded_record
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


class _BoundedTracker(ProgressTracker):
    """hivemind's tracker, reading the other workers' records through ``credit``'s bounds. Until
    ``credit`` is set (hivemind's constructor reads the stage once) records are taken as found."""

    credit: EpochCredit | None = None
    trusted_epoch = 0
    """An epoch taken as given, without credit: the stage's as first found, or a downloaded state's."""
    uncounted = (0, 0)
    """(epoch, samples): what the other workers claim of that epoch beyond what counts here."""

    def _parse_swarm_progress_data(self, metadata) -> GlobalTrainingProgress:
        credit = self.credit
        if credit is None or not isinstance(metadata, dict):
            return super()._parse_swarm_progress_data(metadata)
        own = self.local_progress
        others = [subkey for subkey, entry in metadata.items()
                  if subkey != self._local_public_key and isinstance(entry.value, dict)]
        credit.earn(len(others))
        allowed = max(credit.allowed_epoch(own.epoch), self.trusted_epoch)
        metadata, uncounted = dict(metadata), {}
        for subkey in others:
            claimed = metadata[subkey]
            record = bounded_record(claimed.value, allowed, own.samples_accumulated)
            metadata[subkey] = ValueWithExpiration(record, claimed.expiration_time)
            if record["epoch"] == claimed.value["epoch"]:
                uncounted[record["epoch"]] = uncounted.get(record["epoch"], 0) + claimed.value["samples_accumulated"] - record["samples_accumulated"]
        progress = super()._parse_swarm_progress_data(metadata)
        self.uncounted = (progress.epoch, uncounted.get(progress.epoch, 0))
        return progress


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
        self.tracker = _BoundedTracker(
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
        self.credit = EpochCredit(target_batch_size, refresh_period)
        with self.tracker.pause_updates():
            self.tracker.trusted_epoch = self.tracker.global_epoch  # the stage as this worker finds it
            self.tracker.credit = self.credit
        self.epoch = 0
        self._carry = 0  # this worker's share of the last epoch's overshoot, counted towards this one
        self._reported = 0  # this worker's samples of the current epoch, carry included
        # the largest stage count of the current epoch this worker has seen, and its own part in it then:
        # when another worker ends the epoch first, this worker still knows how far past the target it went
        self._seen_total = self._seen_own = 0
        if epoch:
            self._enter(epoch)

    def jump_to(self, epoch: int) -> None:
        """Continue from the state downloaded from a peer, at ``epoch``: that epoch is taken as given
        (like the weights), and a higher one found on the stage at the start no longer is."""
        with self.tracker.pause_updates():
            self.tracker.trusted_epoch = epoch
        self._enter(epoch)

    def _enter(self, epoch: int) -> None:
        with self.tracker.pause_updates():
            self.epoch = self.tracker.update_epoch(epoch)
        self._carry = self._reported = self._seen_total = self._seen_own = 0

    @property
    def stage_epoch(self) -> int:
        """The furthest epoch of the stage's workers this worker believes (progress_bounds)."""
        return self.tracker.global_epoch

    @property
    def counted(self) -> int:
        return self._reported

    def report(self, samples_accumulated: int) -> None:
        self._reported = self._carry + samples_accumulated
        self.tracker.report_local_progress(self.epoch, self._reported)
        rate = self.tracker.performance_ema
        if rate.num_updates:  # before its first update hivemind's estimate is a placeholder (1e-20)
            self.credit.measured(rate.samples_per_second)
        self._observe()

    def ready(self) -> bool:
        # samples only: hivemind's tracker also fires when its estimate of the time to the target runs
        # out, which stepped stages on gradients of a few samples and on clocks that differ per stage
        tracker = self.tracker
        self._observe()
        if tracker.global_epoch > self.epoch or tracker.global_progress.samples_accumulated >= tracker.target_batch_size:
            return True
        # the others claim more than counts here (a worker that served little or nothing this epoch): the
        # epoch ends on their word, paid for like an epoch followed
        epoch, uncounted = tracker.uncounted
        claimed = tracker.global_progress.samples_accumulated + (uncounted if epoch == self.epoch else 0)
        return claimed >= tracker.target_batch_size and self.credit.credit >= 1

    def _observe(self) -> None:
        tracker = self.tracker
        if tracker.global_epoch == self.epoch and tracker.global_progress.samples_accumulated >= self._seen_total:
            self._seen_total, self._seen_own = tracker.global_progress.samples_accumulated, self._reported

    def advance(self, epoch_total: int | None = None) -> int:
        self._observe()
        # else the epoch's count as this worker knows it: the others' part when last seen, its own part now
        total = epoch_total if epoch_total is not None else self._seen_total + self._reported - self._seen_own
        target = self.tracker.target_batch_size
        carry = overshoot_share(self._reported, total, target)
        with self.tracker.pause_updates():
            epoch = max(self.epoch + 1, self.tracker.global_epoch)
            # epochs this worker's own count did not end are paid for out of the credit
            ended_here = self.epoch + (total >= target)
            self.credit.spend(max(0, epoch - max(ended_here, self.tracker.trusted_epoch)))
            self.epoch = self.tracker.update_epoch(epoch)
        self._carry = self._reported = self._seen_total = self._seen_own = carry
        if carry:  # not while paused: hivemind's rate estimate refuses updates then
            self.tracker.report_local_progress(self.epoch, carry)
        return self.epoch

    def shutdown(self) -> None:
        self.tracker.shutdown()
