"""Streaming text datasets and packing them into fixed-length token batches for the trainer.

Documents are tokenized, joined with the end-of-text token into one continuous token stream, and
cut into windows of ``seq_len + 1`` tokens; consecutive windows overlap by one token so that every
token of the stream is a prediction target exactly once. A window ``w`` becomes ``tokens = w[:-1]``
and ``labels = w[1:]``. Windows that cross a document boundary are kept on purpose: the model learns
to predict the end-of-text token, and no tokens are wasted on padding.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable, Iterator
from typing import Literal

import datasets
import numpy as np
import torch
from datasets.distributed import split_dataset_by_node
from tokenizers import Tokenizer

from .config import DataConfig
from .corpus import ensure_local_corpus, is_validation_key, resolve_cache_dir
from .position import StreamBatch, StreamPoint, StreamPoints
from .tokenizer import eos_token_id, load_tokenizer

Split = Literal["train", "validation"]
Batch = tuple[torch.Tensor, torch.Tensor]

# Documents per encode_batch call: large enough for the tokenizer's thread pool to pay off, small
# enough that the first batch does not wait for megabytes of text to be tokenized.
_ENCODE_BATCH = 32


def open_text_dataset(config: DataConfig, split: Split) -> datasets.IterableDataset:
    """A streaming dataset of documents for ``split``, with ``config.text_column`` checked to exist.

    Local source: the train or validation file of the stdlib corpus. Hub source: ``config.split`` of
    ``config.dataset``, with the validation documents held out by a stable hash of their text (see
    ``_hold_out``); the hash, unlike a position in the stream, does not depend on sharding or order.
    """
    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
    if split == "validation" and config.validation_fraction == 0:
        raise ValueError("there is no validation split because data.validation_fraction is 0; set it above 0")
    dataset = _open_local(config, split) if config.source == "local" else _open_hub(config)
    _check_text_column(dataset, config)
    if config.source == "hub":
        dataset = _hold_out(dataset, config, split)
    return dataset


def _open_local(config: DataConfig, split: Split) -> datasets.IterableDataset:
    cache_dir = resolve_cache_dir(config.cache_dir)
    path = ensure_local_corpus(cache_dir, config.validation_fraction)[split]
    if path.stat().st_size == 0:
        raise ValueError(
            f"the local corpus has no {split} documents at data.validation_fraction={config.validation_fraction}; "
            "raise data.validation_fraction"
        )
    # A private datasets cache keeps the local source from writing lock files into ~/.cache/huggingface.
    return datasets.load_dataset(
        "json", data_files=str(path), split="train", streaming=True, cache_dir=str(cache_dir / "hf-datasets")
    )


def _open_hub(config: DataConfig) -> datasets.IterableDataset:
    return datasets.load_dataset(config.dataset, name=config.dataset_config, split=config.split, streaming=True)


def _hold_out(dataset: datasets.IterableDataset, config: DataConfig, split: Split) -> datasets.IterableDataset:
    """Keep only the documents of ``split``: validation takes ``validation_fraction`` of them by text hash.

    Reading the validation split therefore streams about ``1 / validation_fraction`` documents per
    validation document; that is acceptable for the few batches an evaluation needs.
    """
    if config.validation_fraction == 0:
        return dataset
    want_validation = split == "validation"
    column, fraction = config.text_column, config.validation_fraction
    return dataset.filter(lambda example: is_validation_key(example[column] or "", fraction) == want_validation)


def _check_text_column(dataset: datasets.IterableDataset, config: DataConfig) -> None:
    columns = dataset.column_names
    if columns is None:
        # Some Hub datasets declare no features; the first example shows the real columns.
        first = next(iter(dataset), None)
        if first is None:
            raise ValueError(f"dataset {_describe(config)} is empty; set data.dataset to a dataset with text")
        columns = list(first)
    if config.text_column not in columns:
        raise ValueError(
            f"dataset {_describe(config)} has no column {config.text_column!r} (columns: {', '.join(columns)}); "
            "set data.text_column to the column that holds the text"
        )


def _describe(config: DataConfig) -> str:
    if config.source == "local":
        return "'local stdlib corpus'"
    return f"{config.dataset!r} (config {config.dataset_config!r}, split {config.split!r})"


class PackedBatches:
    """Iterable of ``(tokens, labels)`` int64 tensors of shape ``[batch_size, seq_len]``.

    Each trainer rank reads a disjoint shard of the stream (``split_dataset_by_node``). The train
    split is shuffled with a buffer of ``config.shuffle_buffer`` documents and seed
    ``config.seed + epoch``, then its packed sequences in blocks of ``config.sequence_shuffle_buffer``
    (each block permuted with a seed of its own, from seed, rank and block number); the validation
    split is never shuffled. The output is a pure function of its arguments. With ``repeat=True`` the
    stream restarts at its end (the next epoch), so iteration never stops; with ``repeat=False`` it
    stops at the end of the data and the last, incomplete batch is dropped.

    While it packs, it notes the start of every block as a ``StreamPoint`` (``points``): the stream
    can be taken up there again with nothing before it tokenized, which is how a restarted trainer
    finds its place cheaply (``numbered(start)``, ``point_for``).
    """

    def __init__(
        self,
        config: DataConfig,
        batch_size: int,
        *,
        split: Split = "train",
        rank: int = 0,
        world_size: int = 1,
        tokenizer: Tokenizer | None = None,
        repeat: bool = True,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.config = config
        self.batch_size = batch_size
        self.split: Split = split
        self.rank = rank
        self.world_size = world_size
        self.repeat = repeat
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.tokenizer)
        self.eos_id = eos_token_id(self.tokenizer)
        self.vocab_size = self.tokenizer.get_vocab_size()
        self.points = StreamPoints()
        self._shuffle = split == "train" and config.sequence_shuffle_buffer > 1
        self._block = config.sequence_shuffle_buffer if self._shuffle else _UNSHUFFLED_BLOCK
        # Opened now so that a wrong dataset name or text column fails at start-up, not mid-training.
        self._documents = open_text_dataset(config, split)

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.numbered():
            yield batch.tokens, batch.labels

    def numbered(self, start: int = 0, skip: Callable[[int], bool] = lambda index: False) -> Iterator[StreamBatch]:
        """The batches from micro-batch ``start`` on, with their place in the stream; those ``skip``
        names are passed over without being packed. Taken up at the latest of ``points`` at or before
        ``start`` (the beginning if none): at most one block is tokenized before ``start``."""
        first_window = start * self.batch_size
        point = self.points.before(first_window)
        if point is None or point.window % self._block:  # none yet, or one from a damaged position file
            point = _BEGINNING
        rows = (window for place, window in self._shuffled_windows(point) if place >= first_window)
        for index in itertools.count(start):
            group = list(itertools.islice(rows, self.batch_size))
            if len(group) < self.batch_size:
                return
            if not skip(index):
                yield StreamBatch(index, *_pack(group))

    def point_for(self, index: int) -> StreamPoint | None:
        """Where to take the stream up to reach micro-batch ``index`` (None: its beginning); the points
        before it are let go, as a trainer's position never goes back."""
        return self.points.before(index * self.batch_size, forget_older=True)

    def windows(self) -> Iterator[np.ndarray]:
        """Windows of ``seq_len + 1`` tokens in stream order, each starting at the previous window's
        last token (views: copy one to keep it)."""
        return self._windows_from(_BEGINNING)

    def _shuffled_windows(self, point: StreamPoint) -> Iterator[tuple[int, np.ndarray]]:
        """The windows from ``point`` (a block's start) on, each block in its shuffled order, with the
        place each takes in the packed stream."""
        seed = (self.config.seed, self.rank) if self._shuffle else None
        return _blocks(self._windows_from(point), self._block, point.window // self._block, seed)

    def _windows_from(self, point: StreamPoint) -> Iterator[np.ndarray]:
        seq_len = self.config.seq_len
        pending, index, cut = point.carry, point.window, point.windows_into_group
        epochs = itertools.count(point.epoch) if self.repeat else range(point.epoch, 1)
        skip_documents = point.documents
        for epoch in epochs:
            produced = False
            for documents, chunk in self._token_chunks(epoch, skip_documents):
                produced = True
                stream = np.concatenate([pending, chunk])
                n_windows = (len(stream) - 1) // seq_len
                for i in range(cut, n_windows):
                    if index % self._block == 0:
                        self.points.add(StreamPoint(window=index, epoch=epoch, documents=documents, carry=pending.copy(), windows_into_group=i))
                    yield stream[i * seq_len : (i + 1) * seq_len + 1]
                    index += 1
                # The leftover starts with the last window's final token, which becomes the next window's first.
                pending, cut = stream[n_windows * seq_len :], 0
            if not produced and skip_documents == 0 and self.repeat:
                raise ValueError(
                    f"rank {self.rank} of {self.world_size} got no documents from the {self.split} split; "
                    "use fewer trainers or a larger dataset"
                )
            skip_documents = 0

    def _token_chunks(self, epoch: int, skip_documents: int) -> Iterator[tuple[int, np.ndarray]]:
        """Token ids of consecutive groups of documents, each document followed by the EOS id, with the
        number of the epoch's documents read before the group. The first ``skip_documents`` are read
        past without being tokenized."""
        examples = iter(self._epoch_dataset(epoch))
        collections.deque(itertools.islice(examples, skip_documents), maxlen=0)
        read = skip_documents
        column = self.config.text_column
        while True:
            before, texts = read, []
            for example in examples:
                read += 1
                if example[column]:  # Hub datasets occasionally hold null or empty texts; they carry no tokens worth an EOS
                    texts.append(example[column])
                    if len(texts) == _ENCODE_BATCH:
                        break
            if not texts:
                return
            flat: list[int] = []
            for ids in self._encode(texts):
                flat.extend(ids)
                flat.append(self.eos_id)
            yield before, np.asarray(flat, dtype=np.int64)

    def _epoch_dataset(self, epoch: int) -> datasets.IterableDataset:
        dataset = self._documents.select_columns([self.config.text_column])
        if self.world_size > 1:
            dataset = split_dataset_by_node(dataset, rank=self.rank, world_size=self.world_size)
        if self.split == "train" and self.config.shuffle_buffer > 0:
            dataset = dataset.shuffle(seed=self.config.seed + epoch, buffer_size=self.config.shuffle_buffer)
        return dataset

    def _encode(self, texts: list[str]) -> list[list[int]]:
        # Special tokens from a post-processor (e.g. a BOS) would break up the packed stream; EOS is added by hand.
        # encode_batch_fast skips offset tracking, which packing does not need (tokenizers >= 0.21).
        encode = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        return [encoding.ids for encoding in encode(texts, add_special_tokens=False)]


_UNSHUFFLED_BLOCK = 1024
"""Windows between two points of a stream that is not shuffled (validation, or the sequence shuffle off)."""
_BEGINNING = StreamPoint(window=0, epoch=0, documents=0, carry=np.empty(0, dtype=np.int64), windows_into_group=0)


def _blocks(windows: Iterator[np.ndarray], size: int, first: int, seed: tuple[int, int] | None) -> Iterator[tuple[int, np.ndarray]]:
    """``windows`` (from the start of block ``first`` on) in blocks of ``size``, each permuted by a
    generator of its own when ``seed`` is given, with the place each window takes in the output. A
    block depends on nothing before it, so the output can be taken up at any block's start."""
    for block in itertools.count(first):
        group = list(itertools.islice(windows, size))
        if seed is not None:
            group = [window.copy() for window in group]  # a view would keep its whole token chunk alive
            np.random.default_rng([*seed, block]).shuffle(group)
        yield from enumerate(group, start=block * size)
        if len(group) < size:
            return


def _pack(rows: list[np.ndarray]) -> Batch:
    packed = torch.from_numpy(np.stack(rows))
    # Contiguous copies: callers serialize these tensors, and views would drag the whole window along.
    return packed[:, :-1].contiguous(), packed[:, 1:].contiguous()


VALIDATION_POOL_TOKENS = 2**22
"""The validation sample is drawn from the first 4M tokens of the split (32 MB of windows): all of the
offline corpus's validation split, a bounded stretch of a streamed one."""
VALIDATION_SEED = 0
"""Fixed, not the training seed: runs with different data orders are scored on the same windows."""


def validation_batches(
    config: DataConfig, batch_size: int, max_batches: int, *, tokenizer: Tokenizer | None = None
) -> list[Batch]:
    """A fixed random sample of the validation split's windows as ``max_batches`` batches, identical on
    every call and in every run. Drawn across the whole split (see ``VALIDATION_POOL_TOKENS``), not its
    first windows, which would score a few documents. Fewer batches come back when the split is smaller."""
    if max_batches <= 0:
        raise ValueError(f"max_batches must be positive, got {max_batches}")
    wanted = max_batches * batch_size
    stream = PackedBatches(config, batch_size, split="validation", tokenizer=tokenizer, repeat=False).windows()
    pool = [window.copy() for window in itertools.islice(stream, max(wanted, VALIDATION_POOL_TOKENS // (config.seq_len + 1)))]
    if len(pool) < batch_size:
        raise ValueError(
            f"the validation split has too few tokens for one batch of {batch_size} x {config.seq_len}; "
            "lower the batch size or data.seq_len, or raise data.validation_fraction"
        )
    chosen = np.random.default_rng(VALIDATION_SEED).choice(len(pool), size=min(wanted, len(pool)), replace=False)
    result = []
    for start in range(0, len(chosen) - batch_size + 1, batch_size):
        packed = torch.from_numpy(np.stack([pool[i] for i in chosen[start : start + batch_size]]))
        result.append((packed[:, :-1].contiguous(), packed[:, 1:].contiguous()))
    return result
