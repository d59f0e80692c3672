"""A stage's epoch ends when its workers' samples reach the target, and only then."""

from __future__ import annotations

import time

from hivemind.utils.crypto import RSAPrivateKey

from agora_server.optim import SwarmProgress
from tests.helpers.polling import wait_until


def test_an_epoch_ends_on_the_stage_samples_not_on_a_time_estimate(dhts):
    first, second = dhts
    # two workers' trackers in one process: each signs its record with its own key, as in two processes
    a = SwarmProgress(first, "run", "body1", target_batch_size=16, refresh_period=0.5, private_key=RSAPrivateKey())
    b = SwarmProgress(second, "run", "body1", target_batch_size=16, refresh_period=0.5, private_key=RSAPrivateKey())
    try:
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
    finally:
        for progress in (a, b):
            progress.shutdown()


def test_samples_beyond_the_target_count_towards_the_next_epoch(dhts):
    first, second = dhts
    a = SwarmProgress(first, "run", "body1", target_batch_size=16, refresh_period=0.5, private_key=RSAPrivateKey())
    b = SwarmProgress(second, "run", "body1", target_batch_size=16, refresh_period=0.5, private_key=RSAPrivateKey())
    try:
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
    finally:
        for progress in (a, b):
            progress.shutdown()


def test_an_epoch_settled_by_a_gradient_round_carries_its_exact_overshoot(dhts):
    first, second = dhts
    a = SwarmProgress(first, "run", "body1", target_batch_size=16, refresh_period=0.5, private_key=RSAPrivateKey())
    b = SwarmProgress(second, "run", "body1", target_batch_size=16, refresh_period=0.5, private_key=RSAPrivateKey())
    try:
        a.report(8)
        b.report(8)
        assert wait_until(lambda: a.ready() and b.ready(), 10.0)
        a.report(14)  # a served 6 more before the round began: b never saw them
        # the round gathered 14 + 8: the 6 beyond the target open epoch 1, shared 4 + 2
        assert a.advance(epoch_total=22) == 1 and b.advance(epoch_total=22) == 1
        assert (a.counted, b.counted) == (4, 2)
        assert wait_until(lambda: a.tracker.global_progress.samples_accumulated == 6 == b.tracker.global_progress.samples_accumulated, 10.0)
    finally:
        for progress in (a, b):
            progress.shutdown()
