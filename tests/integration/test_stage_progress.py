"""A stage's epoch ends when its workers' samples reach the target, and only then; a worker that
forges its record moves the others only as far as progress_bounds allows."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

from hivemind.optim.progress_tracker import ProgressTracker
from hivemind.utils.crypto import RSAPrivateKey

from agora_server.optim import SwarmProgress
from agora_server.optim.progress_bounds import FOLLOW_CAPACITY
from agora_server.wire import stage_key
from tests.helpers.polling import wait_until


@contextlib.contextmanager
def two_workers(dhts) -> Iterator[tuple[SwarmProgress, SwarmProgress]]:
    """Two workers' progress on body1, one per DHT. Both in one process: each signs its record with its
    own key, as in two processes."""
    a = SwarmProgress(dhts[0], "run", "body1", target_batch_size=16, refresh_period=0.5, private_key=RSAPrivateKey())
    b = SwarmProgress(dhts[1], "run", "body1", target_batch_size=16, refresh_period=0.5, private_key=RSAPrivateKey())
    try:
        yield a, b
    finally:
        a.shutdown()
        b.shutdown()


def test_an_epoch_ends_on_the_stage_samples_not_on_a_time_estimate(dhts):
    with two_workers(dhts) as (a, b):
        for samples in range(1, 8):  # fast progress: the time estimate to the target is soon over
            a.report(samples)
            b.report(samples)
            time.sleep(0.05)
        # 14 of 16: several refreshes later neither worker may step
        assert not wait_until(lambda: a.ready() or b.ready(), 3.0), "stepped on a time estimate, 2 samples short"
        b.report(9)  # 7 + 9 = 16: the stage's batch is complete
        assert wait_until(a.ready, 10.0) and b.ready()
        assert a.advance() == 1 and b.advance() == 1
        assert not a.ready() and not b.ready(), "a new epoch starts with no samples"


def test_samples_beyond_the_target_count_towards_the_next_epoch(dhts):
    with two_workers(dhts) as (a, b):
        # each worker processed 12 before it heard of the other's samples: 24 for a target of 16
        a.report(12)
        b.report(12)
        assert wait_until(lambda: a.ready() and b.ready(), 10.0)
        assert wait_until(lambda: a.tracker.global_progress.samples_accumulated == 24 == b.tracker.global_progress.samples_accumulated, 10.0)
        assert a.advance() == 1
        # b hears that a moved on before it steps itself: it still carries its part of the overshoot
        assert wait_until(lambda: b.stage_epoch == 1, 10.0)
        assert b.advance() == 1
        # the 8 samples beyond the target open epoch 1, 4 from each worker: 8 more end it
        assert wait_until(lambda: a.tracker.global_progress.samples_accumulated == 8, 10.0)
        assert not a.ready()
        a.report(4)
        b.report(4)
        assert wait_until(lambda: a.ready() and b.ready(), 10.0)


def test_an_epoch_settled_by_a_gradient_round_carries_its_exact_overshoot(dhts):
    with two_workers(dhts) as (a, b):
        a.report(8)
        b.report(8)
        assert wait_until(lambda: a.ready() and b.ready(), 10.0)
        a.report(14)  # a served 6 more before the round began: b never saw them
        # the round gathered 14 + 8: the 6 beyond the target open epoch 1, shared 4 + 2
        assert a.advance(epoch_total=22) == 1 and b.advance(epoch_total=22) == 1
        assert (a.counted, b.counted) == (4, 2)
        assert wait_until(lambda: a.tracker.global_progress.samples_accumulated == 6 == b.tracker.global_progress.samples_accumulated, 10.0)


@contextlib.contextmanager
def honest_beside_a_forger(dhts, epoch: int, samples: int, refresh_period: float) -> Iterator[tuple[SwarmProgress, ProgressTracker]]:
    """An honest worker's progress on the first DHT, then on the second an admitted worker of the stage
    that writes whatever it likes (hivemind's own tracker, fed lies: ``epoch``, ``samples``)."""
    honest = SwarmProgress(dhts[0], "run", "body1", target_batch_size=16, refresh_period=refresh_period, private_key=RSAPrivateKey())
    forger = ProgressTracker(dhts[1], prefix=stage_key("run", "body1"), target_batch_size=16, min_refresh_period=0.5,
                             max_refresh_period=0.5, default_refresh_period=0.5, private_key=RSAPrivateKey(), start=True)
    try:
        forger.report_local_progress(epoch, samples)
        yield honest, forger
    finally:
        honest.shutdown()
        forger.shutdown()


def step_loop(progress: SwarmProgress, seconds: float, before_each: Callable[[], None] = lambda: None) -> float:
    """The worker's loop for ``seconds``, serving nothing itself: step whenever ready. Returns the time it ran."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        before_each()
        if progress.ready():
            progress.advance()
        time.sleep(0.05)
    return time.monotonic() - started


def test_forged_samples_count_for_ten_times_ones_own(dhts):
    with honest_beside_a_forger(dhts, 0, 10**9, refresh_period=0.5) as (honest, _):
        honest.report(1)
        assert wait_until(lambda: honest.tracker.global_progress.num_peers == 2, 10.0), "the forged record is read"
        assert honest.tracker.global_progress.samples_accumulated == 11, "10^9 claimed, 10 counted: 10 × its own 1"
        honest.report(2)  # 2 + 20 of 16: the bound's worst case, the epoch ends on 2 samples of its own
        assert wait_until(lambda: honest.tracker.global_progress.samples_accumulated == 22, 10.0)
        assert honest.ready() and honest.advance() == 1
        assert honest.credit.credit == FOLLOW_CAPACITY, "ended by its own count: nothing paid"


def test_forged_samples_end_epochs_only_as_fast_as_the_stage_could_go(dhts):
    # a refresh period of 2 s: the forged rate makes hivemind refresh every 0.5 s, four times as often
    with honest_beside_a_forger(dhts, 0, 10**9, refresh_period=2.0) as (honest, forger):
        # 10^9 samples of whatever epoch the worker is in
        elapsed = step_loop(honest, 10.0, lambda: forger.report_local_progress(honest.epoch, 10**9))
        # every epoch ends on the forger's word alone, paid from the credit: after the first
        # FOLLOW_CAPACITY, one per refresh period (nothing of its own measured)
        assert honest.credit.epochs_per_second(1) == 0.5
        assert 1 <= honest.epoch <= FOLLOW_CAPACITY + 0.5 * (elapsed + 2.0), honest.epoch


def test_a_forged_epoch_is_followed_no_faster_than_the_stage_could_go(dhts):
    with honest_beside_a_forger(dhts, 10**6, 10**9, refresh_period=0.5) as (honest, _):
        assert wait_until(lambda: honest.stage_epoch > 0, 10.0), "the forged record is read"
        assert honest.stage_epoch == FOLLOW_CAPACITY, "read as only as far ahead as the credit a worker starts with"
        elapsed = step_loop(honest, 4.0)
        # nothing of its own measured: one epoch per refresh period (0.5 s) of the other worker, after the
        # first FOLLOW_CAPACITY at once (a refresh period of slack for when the last one was read)
        assert honest.credit.epochs_per_second(1) == 2.0
        assert 1 <= honest.epoch <= FOLLOW_CAPACITY + 2.0 * (elapsed + 1.0), honest.epoch
        assert honest.stage_epoch <= honest.epoch + FOLLOW_CAPACITY
