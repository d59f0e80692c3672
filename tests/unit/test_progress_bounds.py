"""What a worker believes of the other workers' progress records and averaging contributions, on
hand-computed cases."""

import pytest
import torch

from agora_server.optim.averaging import AveragingConfig, implausible_average, round_weight_bound
from agora_server.optim.progress_bounds import FOLLOW_CAPACITY, PLAUSIBLE_FACTOR, EpochCredit, bounded_record, counted_samples


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def record(epoch: int, samples: int) -> dict:
    return {"peer_id": b"x", "epoch": epoch, "samples_accumulated": samples, "samples_per_second": 1e9, "time": 0.0, "client_mode": False}


def test_another_workers_samples_count_for_at_most_ten_times_this_workers_own():
    assert PLAUSIBLE_FACTOR == 10
    assert counted_samples(9, own=7) == 9, "an honest partner's count stands"
    assert counted_samples(10**9, own=3) == 30
    assert counted_samples(10**9, own=0) == 0, "a worker with nothing of its own this epoch steps only by following"


def test_a_record_past_the_allowed_epoch_is_read_at_that_epoch_with_no_samples():
    assert bounded_record(record(10**6, 10**9), allowed_epoch=7, own_samples=4) == record(7, 0)
    assert bounded_record(record(7, 10**9), allowed_epoch=7, own_samples=4) == record(7, 40)
    assert bounded_record(record(5, 12), allowed_epoch=7, own_samples=4) == record(5, 12)


def test_followed_epochs_are_paid_from_a_credit_earned_at_the_stages_plausible_rate():
    clock = Clock()
    credit = EpochCredit(target_batch_size=16, refresh_period=2.0, clock=clock)
    assert credit.allowed_epoch(5) == 5 + FOLLOW_CAPACITY == 7, "a full credit at the start"
    credit.spend(2)
    credit.earn(others=1)
    assert credit.allowed_epoch(7) == 7
    # nothing measured of its own: one epoch per refresh period per other worker
    assert credit.epochs_per_second(1) == 0.5
    clock.now += 3.0
    credit.earn(others=1)
    assert credit.credit == 1.5 and credit.allowed_epoch(7) == 8
    # measured: 4 samples/s; the other worker may go 40, so the stage ends (4 + 40) / 16 epochs a second
    credit.measured(4.0)
    credit.measured(2.0)
    assert credit.own_peak_rate == 4.0, "the fastest measured"
    assert credit.epochs_per_second(1) == 44 / 16
    credit.spend(1)
    clock.now += 0.2
    credit.earn(others=1)
    assert credit.credit == pytest.approx(0.5 + 0.2 * 44 / 16)
    clock.now += 3600
    credit.earn(others=1)
    assert credit.credit == FOLLOW_CAPACITY, "an hour alone does not let a later forged epoch through at once"
    credit.measured(float("inf"))
    assert credit.own_peak_rate == 4.0


def test_a_rounds_weight_is_bounded_by_the_stages_samples_between_rounds():
    config = AveragingConfig(average_every=5)
    assert round_weight_bound(config, target_batch_size=256) == 2 * 5 * 256


@pytest.mark.parametrize(
    "old, new, refused",
    [
        ([0.02, -0.2], [0.05, -0.15], False),  # moves 0.05 of a scale max(0.2, 0.1)
        ([0.02, -0.2], [0.02, 0.01], True),  # moves 0.21 > 0.2: refused, where the old absolute 1.0 let it through
        ([0.0, 0.0], [0.09, -0.09], False),  # near zero the floor (0.1) is the scale
        ([0.0, 0.0], [0.11, 0.0], True),
        ([3.0, 1.0], [5.5, 1.0], False),  # large weights may move by their own size
        ([0.0, 0.0], [float("nan"), 0.0], True),
    ],
)
def test_an_average_may_move_a_weight_by_max_update_times_its_slices_scale(old, new, refused):
    config = AveragingConfig()
    assert (config.max_update, config.update_floor) == (1.0, 0.1)
    problem = implausible_average([torch.tensor(old)], [torch.tensor(new)], config)
    assert bool(problem) is refused, problem
