#!/usr/bin/env python
"""Train the shipped byte-level BPE tokenizer ``agora-bpe-8k`` on the offline stdlib corpus.

The result is committed as ``agora_server/src/agora_server/data/assets/agora-bpe-8k.json`` so that
nobody trains a tokenizer at run time. Rerun this script only when the corpus or the tokenizer
recipe changes, and note that a new vocabulary invalidates checkpoints trained with the old one.

    python scripts/build_tokenizer.py [--output PATH] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

# Merges are chosen by (count, pair) so training is deterministic anyway; a single worker thread
# additionally rules out any dependence on the machine's core count. Set before tokenizers starts
# its thread pool.
os.environ["RAYON_NUM_THREADS"] = "1"

REPO_ROOT = Path(__file__).resolve().parents[1]
try:
    from agora_server.data.corpus import ensure_local_corpus
except ImportError:  # running from a checkout where agora_server is not pip-installed
    sys.path.insert(0, str(REPO_ROOT / "agora_server" / "src"))
    from agora_server.data.corpus import ensure_local_corpus

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

VOCAB_SIZE = 8192
EOS_TOKEN = "<|endoftext|>"
DEFAULT_OUTPUT = REPO_ROOT / "agora_server" / "src" / "agora_server" / "data" / "assets" / "agora-bpe-8k.json"


def iter_texts(path: Path) -> Iterator[str]:
    """Texts of a JSON-lines corpus file, in file order (the trainer's input order is part of the recipe)."""
    with path.open(encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]


def build_tokenizer(train_file: Path) -> Tokenizer:
    """A byte-level BPE tokenizer with ``EOS_TOKEN`` as id 0, trained on ``train_file``."""
    tokenizer = Tokenizer(models.BPE())
    # Byte-level: any string encodes without unknown tokens and decodes back exactly, so no
    # normalizer may touch the text (it would break the round trip).
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOS_TOKEN],  # listed first, so it gets id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, even ones unseen in training
        min_frequency=2,
        show_progress=False,
    )
    tokenizer.train_from_iterator(iter_texts(train_file), trainer=trainer)
    return tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="where to write tokenizer.json")
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="corpus cache dir (default: $AGORA_CACHE_DIR or ~/.cache/agora)"
    )
    args = parser.parse_args()

    started = time.perf_counter()
    train_file = ensure_local_corpus(args.cache_dir)["train"]
    tokenizer = build_tokenizer(train_file)
    eos_id, vocab_size = tokenizer.token_to_id(EOS_TOKEN), tokenizer.get_vocab_size()
    if eos_id != 0 or vocab_size != VOCAB_SIZE:
        sys.exit(f"training went wrong: {EOS_TOKEN} has id {eos_id} (want 0), vocab {vocab_size} (want {VOCAB_SIZE})")

    args.output.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(args.output), pretty=False)
    size_kib = args.output.stat().st_size / 1024
    print(f"wrote {args.output} ({size_kib:.0f} KiB, vocab {vocab_size}) in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
