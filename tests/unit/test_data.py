"""Tests of agora_server.data: the offline corpus, the shipped tokenizer and packed token batches.

The corpus is built once per session in a temporary cache directory, never in the user's home.
"""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import datasets
import pytest
import torch
from pydantic import ValidationError

from agora_server.data import (
    DataConfig,
    PackedBatches,
    default_cache_dir,
    ensure_local_corpus,
    eos_token_id,
    load_tokenizer,
    open_text_dataset,
    shipped_tokenizers,
    validation_batches,
)
from agora_server.data import stream as stream_module
from tokenizers import Tokenizer, models

SEQ_LEN = 32
BATCH = 4


def read_records(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("agora-cache")


@pytest.fixture(scope="session")
def corpus(cache_dir: Path) -> dict[str, Path]:
    return ensure_local_corpus(cache_dir)


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return load_tokenizer("agora-bpe-8k")


@pytest.fixture
def config(cache_dir: Path, corpus: dict[str, Path]) -> DataConfig:
    return DataConfig(cache_dir=str(cache_dir), seq_len=SEQ_LEN, shuffle_buffer=64, seed=3)


# --- config -------------------------------------------------------------------------------------


def test_config_defaults_are_offline_and_validated() -> None:
    config = DataConfig()
    assert config.source == "local" and config.tokenizer == "agora-bpe-8k"
    for bad in ({"seq_len": 0}, {"validation_fraction": 0.5}, {"shuffle_buffer": -1}, {"unknown_field": 1}):
        with pytest.raises(ValidationError):
            DataConfig(**bad)


def test_cache_dir_comes_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AGORA_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("AGORA_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "agora"


# --- corpus -------------------------------------------------------------------------------------


def test_corpus_is_real_stdlib_source(corpus: dict[str, Path]) -> None:
    records = read_records(corpus["train"]) + read_records(corpus["validation"])
    by_path = {record["path"]: record["text"] for record in records}
    assert "def dedent(text):" in by_path["textwrap.py"]
    assert len(by_path) > 300
    assert not any(part in {"test", "tests", "site-packages"} for path in by_path for part in path.split("/"))


def test_corpus_splits_are_disjoint_and_deterministic(corpus: dict[str, Path], tmp_path: Path) -> None:
    train = {r["path"] for r in read_records(corpus["train"])}
    validation = {r["path"] for r in read_records(corpus["validation"])}
    assert train and validation and not train & validation
    assert 0.005 < len(validation) / (len(train) + len(validation)) < 0.06

    rebuilt = ensure_local_corpus(tmp_path, validation_fraction=0.02)
    for split in ("train", "validation"):
        assert rebuilt[split].read_bytes() == corpus[split].read_bytes()


def test_corpus_is_reused_and_rebuilt_when_damaged(tmp_path: Path) -> None:
    paths = ensure_local_corpus(tmp_path)
    built_at = paths["train"].stat().st_mtime_ns
    assert ensure_local_corpus(tmp_path)["train"].stat().st_mtime_ns == built_at

    original = paths["validation"].read_bytes()
    paths["validation"].write_bytes(original[: len(original) // 2])  # a truncated file
    ensure_local_corpus(tmp_path)
    assert paths["validation"].read_bytes() == original

    (tmp_path / "stdlib-corpus-manifest.json").write_text("{not json")
    ensure_local_corpus(tmp_path)
    assert paths["validation"].read_bytes() == original
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary files left behind


# --- tokenizer ----------------------------------------------------------------------------------


def test_shipped_tokenizer_round_trips_python(tokenizer: Tokenizer) -> None:
    snippet = 'def dedent(text):\n    """Strip common indentation — ünïcode 🐍."""\n\treturn text  # done\n'
    ids = tokenizer.encode(snippet, add_special_tokens=False).ids
    assert tokenizer.decode(ids) == snippet
    assert len(ids) < len(snippet) / 2  # BPE merges actually learned from code
    assert "agora-bpe-8k" in shipped_tokenizers()
    assert tokenizer.get_vocab_size() == 8192
    assert eos_token_id(tokenizer) == 0


def test_tokenizer_from_file_and_clear_errors(tmp_path: Path, tokenizer: Tokenizer) -> None:
    path = tmp_path / "tok.json"
    tokenizer.save(str(path))
    assert load_tokenizer(str(path)).get_vocab_size() == tokenizer.get_vocab_size()

    with pytest.raises(FileNotFoundError, match="data.tokenizer"):
        load_tokenizer(str(tmp_path / "missing.json"))

    no_eos = Tokenizer(models.BPE())
    with pytest.raises(ValueError, match="end-of-text"):
        eos_token_id(no_eos)


# --- streaming and packing ----------------------------------------------------------------------


def test_text_dataset_checks_its_column(config: DataConfig) -> None:
    first = next(iter(open_text_dataset(config, "validation")))
    assert isinstance(first["text"], str)
    with pytest.raises(ValueError, match="data.text_column"):
        open_text_dataset(config.model_copy(update={"text_column": "content"}), "train")


def test_packed_batches_shapes_and_shifted_labels(config: DataConfig, tokenizer: Tokenizer) -> None:
    in_stream_order = config.model_copy(update={"sequence_shuffle_buffer": 0})
    batches = iter(PackedBatches(in_stream_order, BATCH, tokenizer=tokenizer))
    first, second = next(batches), next(batches)
    for tokens, labels in (first, second):
        assert tokens.shape == labels.shape == (BATCH, SEQ_LEN)
        assert tokens.dtype == labels.dtype == torch.int64
        assert tokens.is_contiguous() and labels.is_contiguous()
        assert 0 <= int(tokens.min()) and int(tokens.max()) < tokenizer.get_vocab_size()
        assert torch.equal(labels[:, :-1], tokens[:, 1:])
        # Windows overlap by one token, so each row continues the previous one.
        assert torch.equal(tokens[1:, 0], labels[:-1, -1])
    assert int(second[0][0, 0]) == int(first[1][-1, -1])
    # Documents are separated by EOS somewhere in the first few windows (many stdlib files are short).
    assert any((tokens == 0).any() for tokens, _ in islice(batches, 200))


def test_packed_batches_are_deterministic_per_seed_and_rank(config: DataConfig, tokenizer: Tokenizer) -> None:
    def first_batch(**kwargs: object) -> torch.Tensor:
        return next(iter(PackedBatches(config, BATCH, tokenizer=tokenizer, **kwargs)))[0]

    assert torch.equal(first_batch(), first_batch())
    assert not torch.equal(first_batch(rank=0, world_size=2), first_batch(rank=1, world_size=2))

    other_seed = next(iter(PackedBatches(config.model_copy(update={"seed": 4}), BATCH, tokenizer=tokenizer)))[0]
    assert not torch.equal(first_batch(), other_seed)


def test_packed_batches_stop_or_repeat_at_the_end(config: DataConfig, tokenizer: Tokenizer) -> None:
    one_pass = list(PackedBatches(config, BATCH, split="validation", tokenizer=tokenizer, repeat=False))
    assert one_pass
    endless = PackedBatches(config, BATCH, split="validation", tokenizer=tokenizer)
    repeated = list(islice(endless, 2 * len(one_pass) + 1))
    assert len(repeated) == 2 * len(one_pass) + 1
    assert all(torch.equal(a[0], b[0]) for a, b in zip(one_pass, repeated))

    with pytest.raises(ValueError, match="rank"):
        PackedBatches(config, BATCH, rank=2, world_size=2, tokenizer=tokenizer)


def continuation_rate(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """How often a sequence is the stream's next window after the one before it (1.0: stream order)."""
    rows = torch.cat([tokens for tokens, _ in batches])
    labels = torch.cat([labels for _, labels in batches])
    return float((rows[1:, 0] == labels[:-1, -1]).float().mean())


def test_sequences_are_shuffled_across_documents(config: DataConfig, tokenizer: Tokenizer) -> None:
    in_order = config.model_copy(update={"sequence_shuffle_buffer": 0})
    assert continuation_rate(list(islice(PackedBatches(in_order, BATCH, tokenizer=tokenizer), 100))) > 0.95
    mixed = list(islice(PackedBatches(config, BATCH, tokenizer=tokenizer), 100))
    assert continuation_rate(mixed) < 0.1, "consecutive sequences come from all over the buffer"
    again = list(islice(PackedBatches(config, BATCH, tokenizer=tokenizer), 100))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(mixed, again)), "deterministic per seed and rank"
    other_rank = next(iter(PackedBatches(config, BATCH, tokenizer=tokenizer, rank=1, world_size=2)))[0]
    assert not torch.equal(mixed[0][0], other_rank)


def test_the_sequence_shuffle_loses_and_repeats_nothing_and_can_be_taken_up_at_any_block() -> None:
    import numpy as np

    windows = [np.array([i, i + 1]) for i in range(1000)]
    out = list(stream_module._blocks(iter(windows), 64, 0, (1, 0)))
    assert [place for place, _ in out] == list(range(1000))
    assert sorted(int(w[0]) for _, w in out) == list(range(1000))
    assert [int(w[0]) for _, w in out] != list(range(1000))
    assert all(place // 64 == int(w[0]) // 64 for place, w in out), "a window stays in its block"
    again = list(stream_module._blocks(iter(windows), 64, 0, (1, 0)))
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(out, again))
    # what a restarted trainer does: start at block 3 with none of the windows before it
    taken_up = list(stream_module._blocks(iter(windows[3 * 64 :]), 64, 3, (1, 0)))
    assert [(p, int(w[0])) for p, w in taken_up] == [(p, int(w[0])) for p, w in out[3 * 64 :]]
    other_rank = [int(w[0]) for _, w in stream_module._blocks(iter(windows), 64, 0, (1, 1))]
    assert other_rank != [int(w[0]) for _, w in out]


def test_validation_windows_are_sampled_across_the_whole_split(config: DataConfig, tokenizer: Tokenizer) -> None:
    every = [w.copy() for w in PackedBatches(config, BATCH, split="validation", tokenizer=tokenizer, repeat=False).windows()]
    position = {w.tobytes(): i for i, w in enumerate(every)}
    sample = validation_batches(config, BATCH, max_batches=8, tokenizer=tokenizer)
    picked = sorted(position[torch.cat([t[:, :1], l], dim=1)[row].numpy().tobytes()] for t, l in sample for row in range(BATCH))
    assert len(set(picked)) == 8 * BATCH, "no window twice"
    assert picked[0] < len(every) * 0.2 and picked[-1] > len(every) * 0.8, "from the start to the end of the split"
    assert picked != list(range(8 * BATCH)), "not just the first windows"


def test_validation_batches_are_fixed(config: DataConfig, tokenizer: Tokenizer) -> None:
    first = validation_batches(config, BATCH, max_batches=5)
    second = validation_batches(config.model_copy(update={"seed": 99}), BATCH, max_batches=5, tokenizer=tokenizer)
    assert len(first) == 5
    for (tokens_a, labels_a), (tokens_b, labels_b) in zip(first, second):
        assert torch.equal(tokens_a, tokens_b) and torch.equal(labels_a, labels_b)
        assert tokens_a.shape == (BATCH, SEQ_LEN)

    with pytest.raises(ValueError, match="validation_fraction"):
        validation_batches(config.model_copy(update={"validation_fraction": 0.0}), BATCH, max_batches=1)


def test_hub_source_holds_out_validation_by_text(monkeypatch: pytest.MonkeyPatch, config: DataConfig) -> None:
    texts = [f"document number {i}\n" for i in range(400)]

    def fake_load_dataset(path: str, name: str | None = None, split: str = "", streaming: bool = False):
        assert (path, name, split, streaming) == ("some/dataset", "cfg", "train", True)
        return datasets.Dataset.from_dict({"content": texts, "id": list(range(400))}).to_iterable_dataset()

    monkeypatch.setattr(stream_module.datasets, "load_dataset", fake_load_dataset)
    hub_fields = {"source": "hub", "dataset": "some/dataset", "dataset_config": "cfg", "text_column": "content"}
    hub = DataConfig(**{**config.model_dump(), **hub_fields, "validation_fraction": 0.1})
    train = [row["content"] for row in open_text_dataset(hub, "train")]
    validation = [row["content"] for row in open_text_dataset(hub, "validation")]
    assert sorted(train + validation) == sorted(texts)
    assert 10 < len(validation) < 80

    with pytest.raises(ValueError, match="data.text_column"):
        open_text_dataset(hub.model_copy(update={"text_column": "text"}), "train")
