from agora_server.pipeline.balancer import StageBalancer
from agora_server.wire import ServerPhase, StageServerInfo
from tests.helpers.clock import ManualClock


def info(throughput, phase=ServerPhase.ONLINE, started_at=0.0):
    return StageServerInfo(stage="body1", phase=phase, throughput=throughput, max_batch_size=8, wire_dtype="float32", started_at=started_at)


def balancer(clock=None):
    return StageBalancer("body1", default_throughput=100.0, ban_seconds=10.0, ban_max_seconds=35.0, clock=clock or ManualClock(100.0))


def test_picks_the_earliest_expected_finish():
    b = balancer()
    b.update_peers({"fast": info(1000.0), "slow": info(100.0)})
    # fast: (0+500)/1000 = 0.5 s; slow: 5 s
    assert b.choose(500) == "fast"
    # fast now has 500 queued: (500+500)/1000 = 1 s, still ahead of slow
    assert b.choose(500) == "fast"
    b.update_peers({"fast": info(1000.0), "slow": info(100.0)})
    for _ in range(8):
        b.choose(500)
    # fast carries 10×500 tokens = 5.5 s for one more, slow 5 s: slow wins now
    assert b.choose(500) == "slow"


def test_measured_throughput_replaces_the_announced_one():
    b = balancer()
    b.update_peers({"a": info(1000.0), "b": info(500.0)})
    peer = b.choose(100)
    assert peer == "a"
    b.succeeded("a", 100, elapsed=10.0)  # measured 10 tokens/s: far slower than announced
    b.update_peers({"a": info(1000.0), "b": info(500.0)})  # a stale announcement must not undo the measurement
    assert b.choose(100) == "b"


def test_failed_worker_is_banned_with_growing_backoff():
    clock = ManualClock(100.0)
    b = balancer(clock)
    b.update_peers({"a": info(100.0), "b": info(10.0)})
    assert b.choose(10) == "a"
    assert b.failed("a", 10) == 10.0
    assert b.choose(10) == "b"
    b.released("b", 10)
    clock.now += 10.5
    assert b.choose(10) == "a"
    assert b.failed("a", 10) == 20.0
    assert b.failed("a", 0) == 35.0  # capped
    clock.now += 36
    assert b.choose(10, exclude=["b"]) == "a"
    b.succeeded("a", 10, 0.1)
    assert b.peers["a"].consecutive_failures == 0


def test_catching_up_and_vanished_workers_are_not_routed_to():
    b = balancer()
    b.update_peers({"a": info(100.0, ServerPhase.CATCHING_UP), "b": info(100.0)})
    assert b.usable() == ["b"]
    b.update_peers({"a": info(100.0)})
    assert b.usable() == ["a"]
    b.update_peers({})
    assert b.choose(10) is None


def test_exclude_prefers_a_worker_not_yet_tried():
    b = balancer()
    b.update_peers({"a": info(1000.0), "b": info(10.0)})
    assert b.choose(10, exclude=["a"]) == "b"


def test_an_unmeasured_newcomer_is_tried():
    b = balancer()
    b.update_peers({"old": info(0.0)})
    b.succeeded("old", b.choose(1000) and 1000, elapsed=0.1)  # measured: 10,000 tokens/s
    b.update_peers({"old": info(0.0), "new": info(0.0)})
    assert b.expected_throughput("new") == b.expected_throughput("old") == 10_000
    b.choose(1000)  # the old worker has work in flight now
    assert b.choose(1000) == "new"


def test_a_worker_seen_at_start_but_not_yet_measured_is_not_starved():
    b = balancer()
    b.update_peers({"a": info(0.0), "b": info(0.0)})
    first = b.choose(1000)
    b.succeeded(first, 1000, elapsed=0.01)  # measured very fast
    other = "b" if first == "a" else "a"
    b.choose(1000)
    assert b.choose(1000) == other, "the unmeasured worker must be tried once the measured one has work queued"


def test_a_restarted_worker_is_no_longer_banned_for_what_its_old_process_did():
    clock = ManualClock(100.0)
    b = balancer(clock)
    b.update_peers({"a": info(100.0)})
    b.choose(10)
    b.failed("a", 10)
    b.update_peers({"a": info(100.0)})  # the same process announcing again: still banned
    assert b.choose(10) is None
    b.update_peers({"a": info(100.0, started_at=123.0)})
    assert b.choose(10) == "a"
    assert b.peers["a"].consecutive_failures == 0


def test_an_unmeasured_claim_is_believed_only_up_to_a_bound():
    b = balancer()  # default 100 tokens/s, claims believed up to 10x
    b.update_peers({"liar": info(1e12), "honest": info(50.0)})
    assert b.expected_throughput("liar") == 1000.0, "10x the default while nobody is measured"
    b.succeeded("honest", b.choose(100) and 0, elapsed=0.0)  # measured: 1e-3 floor, never zero
    b.succeeded("honest", 400, elapsed=1.0)
    best = b.peers["honest"].throughput
    assert b.expected_throughput("liar") == 10 * max(best, 100.0)
    # the liar takes its share of new work, not all of it: the honest worker gets work while the liar's is in flight
    chosen = [b.choose(100) for _ in range(30)]
    assert chosen.count("honest") > 0


def test_a_refusing_worker_is_banned_like_a_failing_one():
    clock = ManualClock(100.0)
    b = balancer(clock)
    b.update_peers({"refuser": info(1e12), "honest": info(100.0)})
    assert b.choose(10) == "refuser"
    assert b.failed("refuser", 10) == 10.0  # what the trainer does with a refusal now
    assert [b.choose(10) for _ in range(5)] == ["honest"] * 5
