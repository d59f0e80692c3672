"""A trainer killed mid-run and started again continues its data stream: the coordinator gives its key
the same data shard again, no micro-batch it completed is trained twice (their token ids compared),
and it reports where it took up the stream."""

import itertools
import signal

from agora_server.data import PackedBatches
from agora_server.data.position import tokens_digest
from agora_server.telemetry import events as ev

STEPS = 500  # more than the test lets either run complete: both runs end by the test's hand


def completed(swarm, since: int, until: int | None = None) -> list[ev.MicroBatchCompleted]:
    return swarm.events_of("trainer", ev.MicroBatchCompleted, since, until)


def wait_for_completions(swarm, count: int, since: int, timeout: float) -> bool:
    """The run of the trainer whose events start at ``since`` completed at least ``count`` micro-batches."""
    return swarm.wait_for("trainer", ev.MicroBatchCompleted, timeout=timeout, since=since, count=count) is not None


def shards_read(swarm, since: int) -> list[tuple[int, int, bool]]:
    return [(e.rank, e.shards, e.by_coordinator) for e in swarm.events_of("trainer", ev.DataShardChosen, since)]


def test_a_restarted_trainer_does_not_repeat_the_micro_batches_it_completed(swarm_harness):
    # two data shards: the trainer reads the first, and its restart must read that one again
    swarm = swarm_harness.create({"trainer": {"validation_every": 0, "data_shards": 2}}, steps=STEPS, coordinator=True)
    swarm.start()
    first = swarm.process("trainer")
    assert wait_for_completions(swarm, 12, first.first_event, 240), "the first trainer never got going"
    assert shards_read(swarm, first.first_event) == [(0, 2, True)], "the coordinator gives the first key the first shard"

    swarm.kill("trainer", signal.SIGKILL)  # no goodbye: whatever it had in flight is lost with it
    assert first.popen.wait(30) == -signal.SIGKILL
    first.pump.join(30)  # every event it wrote before it died has been read
    second = swarm.start_trainer()
    before = completed(swarm, first.first_event, second.first_event)
    resumed = swarm.wait_for("trainer", ev.DataResumed, timeout=120, since=second.first_event)
    assert resumed is not None and resumed.finished >= len(before)
    assert shards_read(swarm, second.first_event) == [(0, 2, True)], "the same key reads the same shard again"
    assert wait_for_completions(swarm, 12, second.first_event, 240), "the restarted trainer never got going"
    after = completed(swarm, second.first_event)

    # what the trainers say they trained is what that place of the stream holds
    config = swarm.config
    stream = PackedBatches(config.data, config.trainer.micro_batch_size, rank=0, world_size=2).numbered()
    last = max(e.data_index for e in before + after)
    digests = {b.index: tokens_digest(b.tokens) for b in itertools.islice(stream, last + 1)}
    assert all(e.tokens_digest == digests[e.data_index] for e in before + after)

    trained_before = {e.data_index for e in before}
    assert len(trained_before) == len(before), "the first run trained a micro-batch twice"
    repeated = trained_before & {e.data_index for e in after}
    assert not repeated, f"micro-batches trained again after the restart: {sorted(repeated)}"
    assert {e.tokens_digest for e in before}.isdisjoint(e.tokens_digest for e in after)
    assert min(e.data_index for e in after) >= resumed.next_index
