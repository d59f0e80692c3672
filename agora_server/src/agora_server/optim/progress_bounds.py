"""How much of the other workers' progress records a worker believes.

A stage's workers publish (epoch, samples) records and each worker steps when the stage's count
reaches its target, or follows a worker that announces a later epoch. Any admitted worker of the
stage can write any numbers there, and with two workers on a stage no local rule can tell which of
them is lying. So the numbers are not judged, they are bounded, against the one rate this worker
knows to be true, its own:

- another worker's samples of this worker's epoch count for at most ``PLAUSIBLE_FACTOR`` times this
  worker's own samples of it (carry included). An epoch this count ends is free: a forged count ends
  one only once this worker has contributed ``1 / (PLAUSIBLE_FACTOR + 1)`` of the target itself, so
  it takes at most ``PLAUSIBLE_FACTOR + 1`` times the steps it would take alone.
- any other epoch change is paid out of a credit: an epoch entered because another worker
  announced it, or ended because the others claim more samples than count here (a worker that
  served little or nothing of the epoch). The credit is earned with time at the rate the stage could
  end epochs if every other worker went ``PLAUSIBLE_FACTOR`` times this worker's fastest measured
  rate, spent one per epoch, and held to ``FOLLOW_CAPACITY`` epochs. A worker that has measured
  nothing yet (a newcomer catching up, a worker nobody routes to) earns one epoch per refresh period
  per other worker. A forged epoch of 10^6 moves this worker at most that fast, never there at once.

Honest stages are far inside both bounds (workers of one stage process within a few times each
other's rate, and their epochs end at the stage's rate, which the credit outruns ``PLAUSIBLE_FACTOR``
fold), so they step exactly as without them. A worker that is truly far behind catches up through
the state download, whose epoch it takes as given (as it takes the weights), and so does a worker
starting: the first epoch it finds on the stage is taken as found.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

PLAUSIBLE_FACTOR = 10
"""How many times this worker's own rate another worker of its stage is believed to go at most."""
FOLLOW_CAPACITY = 2
"""The most epochs a worker follows at once beyond what its own count ended."""


def counted_samples(claimed: int, own: int) -> int:
    """The part of another worker's claimed samples of this worker's epoch that counts here."""
    return min(claimed, PLAUSIBLE_FACTOR * own)


class EpochCredit:
    """Epochs this worker may follow other workers by: earned with time, spent per epoch followed."""

    def __init__(self, target_batch_size: int, refresh_period: float, clock: Callable[[], float] = time.monotonic):
        self.target_batch_size, self.refresh_period, self._clock = target_batch_size, refresh_period, clock
        self.own_peak_rate = 0.0  # samples per second, the fastest this worker has measured itself
        self.credit = float(FOLLOW_CAPACITY)
        self._earned_at = clock()

    def measured(self, samples_per_second: float) -> None:
        if math.isfinite(samples_per_second):
            self.own_peak_rate = max(self.own_peak_rate, samples_per_second)

    def epochs_per_second(self, others: int) -> float:
        """How fast the stage could plausibly end epochs, as this worker knows it."""
        if self.own_peak_rate <= 0:
            return others / self.refresh_period
        return (1 + PLAUSIBLE_FACTOR * others) * self.own_peak_rate / self.target_batch_size

    def earn(self, others: int) -> None:
        now = self._clock()
        self.credit = min(float(FOLLOW_CAPACITY), self.credit + (now - self._earned_at) * self.epochs_per_second(others))
        self._earned_at = now

    def allowed_epoch(self, epoch: int) -> int:
        """The furthest epoch another worker's record is believed up to, this worker being at ``epoch``."""
        return epoch + max(0, math.floor(self.credit))

    def spend(self, epochs: int) -> None:
        self.credit -= epochs


def bounded_record(record: dict, allowed_epoch: int, own_samples: int) -> dict:
    """Another worker's progress record (hivemind's LocalTrainingProgress fields) as this worker counts
    it: an epoch past ``allowed_epoch`` is read as that epoch with no samples, and samples are capped."""
    if record["epoch"] > allowed_epoch:
        return {**record, "epoch": allowed_epoch, "samples_accumulated": 0}
    return {**record, "samples_accumulated": counted_samples(record["samples_accumulated"], own_samples)}
