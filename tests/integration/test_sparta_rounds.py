"""SPARTA rounds between real averagers: hivemind DHTs and matchmaking on 127.0.0.1, in one process."""

import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from hivemind import DHT

from agora_server.optim.averaging import AveragingConfig, RoundResult, SpartaAverager
from agora_server.optim.sparta import slice_for_epoch
from tests.helpers.standin_device import StandInDeviceTensor, on_standin_device

CONFIG = AveragingConfig(fraction=0.5, average_every=4, matchmaking_time=2.0, averaging_timeout=20.0, request_timeout=1.0)


class FaultyAverager(SpartaAverager):
    """A peer that sends whatever it holds, finite or not."""

    @staticmethod
    def _may_contribute(snapshot) -> bool:
        return True


class Peer:
    def __init__(self, dht: DHT, params: list[torch.Tensor], config: AveragingConfig, epoch: int = 0, faulty: bool = False, alone: bool = False,
                 max_weight: float = math.inf):
        self.params, self.results, self.updates = params, [], 0
        self.compute = ThreadPoolExecutor(max_workers=1)  # stands in for the worker's compute thread
        self.averager = (FaultyAverager if faulty else SpartaAverager)(
            dht, "test.body1", params, config, seed=7, epoch=epoch, on_compute=self.compute.submit, on_result=self.results.append,
            has_partners=lambda: not alone, on_update=self._updated, max_weight=max_weight,
        )

    def _updated(self):
        self.updates += 1

    def close(self):
        self.averager.shutdown()
        self.compute.shutdown()


@pytest.fixture
def make_peer():
    peers = []

    def make(dht, params, config=CONFIG, epoch=0, faulty=False, alone=False, max_weight=math.inf):
        peers.append(Peer(dht, params, config, epoch, faulty, alone, max_weight))
        return peers[-1]

    yield make
    for peer in peers:
        peer.close()


def run_round(peers, epochs, weights) -> list[RoundResult]:
    futures = [p.averager.maybe_start_round(e, w) for p, e, w in zip(peers, epochs, weights)]
    assert all(f is not None for f in futures), "a round was due on every peer"
    return [f.result(timeout=60) for f in futures]


def test_a_round_averages_its_slice_weighted_by_samples_and_leaves_the_rest(dhts, make_peer):
    a = make_peer(dhts[0], [torch.full((40,), 0.4), torch.full((3, 4), 0.4)])
    b = make_peer(dhts[1], [torch.full((40,), 0.8), torch.full((3, 4), 0.8)])
    # a entered the window at its first epoch; b jumped over it (it followed the stage to epoch 5):
    # both run window 1's round, on the same slice
    results = run_round([a, b], epochs=[4, 5], weights=[3, 1])
    assert [(r.ok, r.group_size, r.slice_index) for r in results] == [(True, 2, 1)] * 2, results
    indices = [a.averager.partition.indices(i, 1) for i in range(2)]
    for peer in (a, b):
        for param, index in zip(peer.params, indices):
            flat = param.reshape(-1)
            assert torch.allclose(flat[index], torch.full((len(index),), 0.5)), "(3·0.4 + 1·0.8) / 4 on the slice"
            untouched = torch.ones(flat.numel(), dtype=torch.bool)
            untouched[index] = False
            assert torch.equal(flat[untouched], torch.full((int(untouched.sum()),), 0.4 if peer is a else 0.8))


def test_weights_on_another_device_average_through_cpu_buffers(dhts, make_peer):
    """As on a GPU: the weights live on a device the averager's float32 CPU buffers are not on, one of
    them in bfloat16. Every crossing goes through the partition's seam, or the stand-in device refuses."""
    a = make_peer(dhts[0], [on_standin_device(torch.full((40,), 0.5)), on_standin_device(torch.full((3, 4), 0.5, dtype=torch.bfloat16))])
    b = make_peer(dhts[1], [on_standin_device(torch.ones(40)), on_standin_device(torch.ones(3, 4, dtype=torch.bfloat16))])
    results = run_round([a, b], epochs=[4, 4], weights=[3, 1])
    assert [(r.ok, r.group_size) for r in results] == [(True, 2)] * 2, results
    for peer, before in ((a, 0.5), (b, 1.0)):
        assert peer.updates == 1, "the worker is told its weights changed (to refresh their compute copy)"
        for i, param in enumerate(peer.params):
            assert isinstance(param, StandInDeviceTensor), "the weights stay where they live"
            flat = param.reshape(-1).cpu()
            index = a.averager.partition.indices(i, 1).long()
            assert torch.isfinite(flat).all()
            assert torch.equal(flat[index], torch.full((len(index),), 0.625, dtype=flat.dtype)), "(3·0.5 + 1·1) / 4 on the slice"
            untouched = torch.ones(flat.numel(), dtype=torch.bool)
            untouched[index] = False
            assert torch.equal(flat[untouched], torch.full((int(untouched.sum()),), before, dtype=flat.dtype))


@pytest.mark.parametrize(
    "sent, refusal",
    # 0.5 moves the good peer's zeros by 0.25: over their scale (the floor, 0.1), under the former absolute 1.0
    [(math.nan, "not finite"), (math.inf, "not finite"), (1e6, "moves a weight by more than"), (0.5, "moves a weight by more than")],
)
def test_a_bad_contribution_is_refused_and_changes_nothing(dhts, make_peer, sent, refusal):
    good = make_peer(dhts[0], [torch.zeros(16)])
    bad = make_peer(dhts[1], [torch.full((16,), sent)], faulty=True)
    results = run_round([good, bad], epochs=[4, 4], weights=[1, 1])
    assert not results[0].ok and refusal in results[0].reason, results[0]
    assert torch.equal(good.params[0], torch.zeros(16)), "a refused round changes nothing"
    assert (good.averager.rounds_ok, good.averager.rounds_failed) == (0, 1)


def test_a_part_carrying_a_weight_over_the_bound_is_left_out(dhts, make_peer):
    """The honest peer bounds weights at 10; the other sends its parts with a weight of 10^6 (its own
    bound is unset) and declares no bandwidth, so the honest peer reduces the whole slice: it averages
    without the inflated parts. A weight of 10^6 against 1 would take the slice to the other's 1.5."""
    honest = make_peer(dhts[0], [torch.ones(40)], max_weight=10)
    inflated = make_peer(dhts[1], [torch.full((40,), 1.5)])
    inflated.averager.averager.bandwidth = 0.0  # gathered from this process at each round: reduce nothing
    run_round([honest, inflated], epochs=[4, 4], weights=[1, 10**6])
    index = honest.averager.partition.indices(0, slice_for_epoch(4, CONFIG.average_every, honest.averager.partition.slices))
    assert torch.equal(honest.params[0][index], torch.ones(len(index))), honest.params[0][index]


def test_a_peer_with_non_finite_weights_does_not_contribute(dhts, make_peer):
    broken = make_peer(dhts[0], [torch.full((16,), math.nan)])
    (result,) = run_round([broken], epochs=[4], weights=[1])
    assert not result.ok and "not contributing" in result.reason, result


def test_one_round_per_window_and_a_due_round_while_busy_is_counted_as_skipped(dhts, make_peer):
    alone = make_peer(dhts[0], [torch.zeros(8)], AveragingConfig(fraction=1.0, average_every=2, matchmaking_time=1.0, request_timeout=0.5))
    assert alone.averager.maybe_start_round(1, 1) is None, "epoch 1 is still in window 0"
    running = alone.averager.maybe_start_round(2, 1)
    assert running is not None
    assert alone.averager.maybe_start_round(3, 1) is None, "window 1 has had its round"
    assert alone.averager.maybe_start_round(4, 1) is None, "window 2 is due while window 1 still looks for a group"
    assert alone.results[0].reason.startswith("skipped"), alone.results
    result = running.result(timeout=60)
    assert not result.ok and result.group_size == 0, "nobody else averages this stage"
    assert alone.averager.rounds_failed == 2
    alone.averager.follow(9)  # state downloaded from a peer at epoch 9: window 4 is past
    assert alone.averager.maybe_start_round(9, 1) is None


def test_a_worker_alone_on_its_stage_runs_no_round_and_counts_no_failure(dhts, make_peer):
    alone = make_peer(dhts[0], [torch.zeros(8)], alone=True)
    for epoch in (4, 8):  # the second window starts: the first did not keep the averager busy
        future = alone.averager.maybe_start_round(epoch, 1)
        assert future is not None and future.result(timeout=10) is None
    assert (alone.averager.rounds_ok, alone.averager.rounds_failed, alone.results) == (0, 0, [])
