"""A trainer's data position and a data source that fails: the real packed stream of the offline corpus,
numbered, skipped past, saved and reloaded, and taken up again where the position points without
tokenizing what came before; a source that raises mid-stream is reopened with backoff and hands out
every micro-batch once."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import pytest
import torch

from agora_server.data import DataConfig, PackedBatches, ensure_local_corpus, load_tokenizer
from agora_server.data.position import DataPosition, PositionFile, StreamBatch, stream_key, tokens_digest
from agora_server.data.retrying import DataSourceGaveUp, RetryingStream, SourceFailure


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> DataConfig:
    cache = tmp_path_factory.mktemp("agora-cache")
    ensure_local_corpus(cache)
    return DataConfig(cache_dir=str(cache), seq_len=32, shuffle_buffer=16, sequence_shuffle_buffer=16, seed=5)


@pytest.fixture(scope="module")
def clean(config) -> list[StreamBatch]:
    return list(itertools.islice(PackedBatches(config, 2).numbered(), 30))


def test_numbered_batches_are_the_plain_stream_and_skipping_only_leaves_out(config, clean):
    plain = list(itertools.islice(iter(PackedBatches(config, 2)), 30))
    assert [b.index for b in clean] == list(range(30))
    assert all(torch.equal(b.tokens, t) and torch.equal(b.labels, l) for b, (t, l) in zip(clean, plain))
    skipped = {0, 1, 2, 7, 11}
    rest = list(itertools.islice(PackedBatches(config, 2).numbered(skip=lambda i: i in skipped), 30 - len(skipped)))
    assert [b.index for b in rest] == [i for i in range(30) if i not in skipped]
    assert all(torch.equal(b.tokens, clean[b.index].tokens) for b in rest)


def test_the_position_keeps_a_low_water_mark_and_the_out_of_order_ones(tmp_path, config):
    position = DataPosition()
    for index in (0, 1, 3, 5):
        position.finish(index)
    assert (position.finished_below, position.finished_above, position.finished) == (2, {3, 5}, 4)
    position.finish(2)
    assert (position.finished_below, position.finished_above) == (4, {5})
    assert [i for i in range(7) if not position.is_finished(i)] == [4, 6]

    key = stream_key(config, 2, rank=0, world_size=1)
    saved = PositionFile(tmp_path / "trainer.position.json", key)
    saved.save(position)
    loaded, why = PositionFile(saved.path, key).load()
    assert (loaded, why) == (position, None)
    other_rank, why = PositionFile(saved.path, stream_key(config, 2, rank=1, world_size=2)).load()
    assert other_rank == DataPosition() and "another data stream" in why
    assert PositionFile(tmp_path / "none.json", key).load() == (DataPosition(), None)
    # the retry settings do not change the stream: a position survives a change of them
    assert stream_key(config.model_copy(update={"retry_max_seconds": 5.0}), 2, 0, 1) == key


class CountingTokenizer:
    """The shipped tokenizer, counting the documents it is given to encode."""

    def __init__(self):
        self.tokenizer, self.documents = load_tokenizer("agora-bpe-8k"), 0

    def encode_batch_fast(self, texts, **kwargs):
        self.documents += len(texts)
        return self.tokenizer.encode_batch_fast(texts, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_a_stream_taken_up_at_a_saved_position_is_the_rest_of_the_uninterrupted_one(tmp_path, config):
    settings = config.model_copy(update={"seq_len": 64})
    batch_size, at, length = 8, 1100, 1160  # 1100 micro-batches of 8 x 64 tokens: past several groups of documents
    whole = PackedBatches(settings, batch_size)
    uninterrupted = list(itertools.islice(whole.numbered(), length))
    position = DataPosition()
    for index in [*range(at), at + 2]:
        position.finish(index)
    position.point = whole.point_for(position.finished_below)
    assert 0 < position.point.window <= at * batch_size
    key = stream_key(settings, batch_size, rank=0, world_size=1)
    PositionFile(tmp_path / "position.json", key).save(position)
    saved, why = PositionFile(tmp_path / "position.json", key).load()
    assert why is None and saved.point.to_json() == position.point.to_json()

    counting = CountingTokenizer()
    restarted = PackedBatches(settings, batch_size, tokenizer=counting)
    restarted.points.add(saved.point)
    rest = list(itertools.islice(restarted.numbered(saved.finished_below, saved.is_finished), length - at - 1))
    assert [b.index for b in rest] == [i for i in range(at, length) if i != at + 2]
    assert all(torch.equal(b.tokens, uninterrupted[b.index].tokens) and torch.equal(b.labels, uninterrupted[b.index].labels)
               for b in rest)

    from_the_start = CountingTokenizer()
    list(itertools.islice(PackedBatches(settings, batch_size, tokenizer=from_the_start).numbered(at), length - at))
    assert counting.documents <= 64 < from_the_start.documents, "only the documents from the saved point on are tokenized"


def flaky(config: DataConfig, fail_at: set[int], opened: list[int]) -> Callable[[int, Callable[[int], bool]], Iterator[StreamBatch]]:
    """The real stream, raising a connection error the first time it reaches each index of ``fail_at``
    (as a Hub stream does when the network drops); reopened where it stopped, as the trainer's is."""
    failed: set[int] = set()
    packed = PackedBatches(config, 2)

    def open_stream(start: int, skip: Callable[[int], bool]) -> Iterator[StreamBatch]:
        opened.append(start)
        for batch in packed.numbered(start, skip):
            if batch.index in fail_at and batch.index not in failed:
                failed.add(batch.index)
                raise ConnectionError(f"Connection reset by peer while reading shard {batch.index}")
            yield batch

    return open_stream


def test_a_failing_source_is_reopened_with_backoff_and_hands_out_every_batch_once(config, clean):
    failures: list[SourceFailure] = []
    waits: list[float] = []
    opened: list[int] = []
    position = DataPosition(finished_below=3, finished_above={6})  # a restarted trainer's position
    stream = RetryingStream(flaky(config, {4, 9, 10}, opened), skip=position.is_finished, on_failure=failures.append,
                            start=position.finished_below, first_wait=1.0, max_wait=1.5, give_up_after=600,
                            sleep=waits.append, clock=lambda: 0.0)
    got = list(itertools.islice(stream, 20))
    expected = [i for i in range(30) if not position.is_finished(i)][:20]
    assert [b.index for b in got] == expected
    assert all(tokens_digest(b.tokens) == tokens_digest(clean[b.index].tokens) for b in got)
    # index 4 fails once; 9 fails, the reopened stream yields 9 and fails at 10
    assert [(f.next_index, f.failures) for f in failures] == [(4, 1), (9, 1), (10, 1)]
    assert waits == [1.0, 1.0, 1.0] and opened == [3, 4, 9, 10]
    assert failures[0].error == "ConnectionError: Connection reset by peer while reading shard 4"


def test_failures_in_a_row_wait_longer_and_a_source_down_for_too_long_stops_the_trainer(config):
    now = [0.0]
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        now[0] += seconds

    def never_works(start, skip):
        raise OSError("Temporary failure in name resolution")
        yield  # a generator, as real streams are

    stream = RetryingStream(never_works, skip=lambda i: False, on_failure=lambda f: None,
                            first_wait=2.0, max_wait=10.0, give_up_after=30.0, sleep=sleep, clock=lambda: now[0])
    with pytest.raises(DataSourceGaveUp, match="failed for 34s.*name resolution"):
        next(iter(stream))
    assert waits == [2.0, 4.0, 8.0, 10.0, 10.0]
