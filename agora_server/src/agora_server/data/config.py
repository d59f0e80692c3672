"""Configuration of the training data: where text comes from, how it is tokenized and packed."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class DataConfig(BaseModel):
    """What the trainer reads and how it turns text into fixed-length token windows.

    The defaults train on the offline corpus (the Python standard library's own source, built on
    first use) with the tokenizer shipped in this package, so a fresh checkout trains without any
    network access. Switch ``source`` to ``"hub"`` for a real run on a large web corpus.
    """

    model_config = ConfigDict(extra="forbid")

    source: Literal["local", "hub"] = "local"
    """``"local"``: the offline corpus of Python standard-library sources, built in ``cache_dir``.
    ``"hub"``: stream ``dataset`` from the Hugging Face Hub. Change it to ``"hub"`` for a real
    training run; keep ``"local"`` for tests, demos and machines without internet access."""

    dataset: str = "HuggingFaceFW/fineweb-edu"
    """Hub dataset id, used only when ``source == "hub"``. Change it to train on another corpus."""

    dataset_config: str | None = "sample-10BT"
    """Hub dataset configuration (subset) name, or ``None`` for datasets without configurations.
    Change it together with ``dataset``; used only when ``source == "hub"``."""

    split: str = "train"
    """Hub split to stream, used only when ``source == "hub"``. The validation examples are held out
    of this same split (see ``validation_fraction``), so change it only if the dataset names its
    training split differently."""

    text_column: str = "text"
    """Column holding the raw text. Change it when the Hub dataset stores text under another name;
    the local corpus always uses ``"text"``."""

    tokenizer: str = Field("agora-bpe-8k", min_length=1)
    """A tokenizer shipped with this package (``agora_server/data/assets/<name>.json``), a path to a
    ``tokenizer.json`` file, or a Hub repo id. Change it only together with the model's vocabulary
    size: every stage of one run must agree on it."""

    seq_len: int = Field(128, gt=0)
    """Tokens per training sequence. Raise it for longer context; it must not exceed the model's
    maximum sequence length, and activation memory grows with it."""

    validation_fraction: float = Field(0.05, ge=0.0, lt=0.5)
    """Share of documents held out for validation, chosen by a stable hash so the split never
    changes between runs (0.05: about 40 files of the offline corpus). Raise it if validation loss is
    too noisy; 0 disables validation."""

    shuffle_buffer: int = Field(1000, ge=0)
    """Documents held in the streaming shuffle buffer (train split only). Larger mixes better but
    uses more memory and delays the first batch; 0 disables shuffling."""

    sequence_shuffle_buffer: int = Field(2048, ge=0)
    """Packed sequences shuffled together, after the documents' shuffle (train split only): the
    stream of sequences is cut into blocks of this many, each permuted on its own. A document longer
    than a micro-batch fills many consecutive ones, so shuffling documents alone still trains on one
    file for dozens of micro-batches; mixing the packed sequences gives every micro-batch sequences of
    many documents. Costs this many sequences of memory (8 bytes per token) and delays the first
    batch until a block is full; a restarted trainer tokenizes at most one block before its saved
    position. 0 disables it."""

    seed: int = 0
    """Seed of the shuffle (epoch ``e`` uses ``seed + e``). Change it to see the data in another
    order; keep it fixed to make a run reproducible."""

    cache_dir: str | None = None
    """Where the local corpus is written. ``None`` means ``$AGORA_CACHE_DIR`` if set, otherwise
    ``~/.cache/agora``. Change it when the home directory is small or read-only."""

    retry_first_seconds: float = Field(2.0, gt=0)
    """Wait before reopening the stream after the data source failed (a network blip on the Hub);
    each further failure in a row doubles it, up to ``retry_max_seconds``."""

    retry_max_seconds: float = Field(120.0, gt=0)
    """Longest wait between two attempts to reopen a failing data source."""

    retry_give_up_seconds: float = Field(3600.0, gt=0)
    """A data source that has failed for this long without yielding a micro-batch stops the trainer
    (an outage of the Hub, or a dataset gone for good); a trainer restarted later resumes from its
    saved position."""
