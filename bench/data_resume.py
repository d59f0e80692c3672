"""How long a restarted trainer takes to find its place in its data stream.

A trainer saves its position after every micro-batch it finishes. Taken up again at micro-batch N, the
stream either walks from its beginning to N, tokenizing every document before it (what a restarted
trainer did before positions carried a stream point), or starts at the saved point (the start of the
shuffle block that holds N), counting past the documents before it without tokenizing them.

Prints one JSON object: for both ways, the seconds until micro-batch N is in hand and the documents
tokenized on the way; `same_batch` says both hand out the same tokens for N.

  .venv/bin/python bench/data_resume.py --position 20000 --output bench/results/data-resume.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import run_and_print  # noqa: E402


class CountingTokenizer:
    """A tokenizer that counts the documents it encodes."""

    def __init__(self, tokenizer):
        self.tokenizer, self.documents = tokenizer, 0

    def encode_batch_fast(self, texts, **kwargs):
        self.documents += len(texts)
        return self.tokenizer.encode_batch_fast(texts, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="local-tiny", help="run config whose data and micro-batch size are used (default local-tiny)")
    parser.add_argument("--position", type=int, default=20000, help="the micro-batch the trainer resumes at (default 20000)")
    parser.add_argument("--output", type=Path, help="also write the JSON to this file")
    return parser.parse_args(argv)


def measure(args: argparse.Namespace) -> dict:
    from agora.config import load_run_config
    from agora_server.data import PackedBatches, load_tokenizer
    from agora_server.data.position import DataPosition, PositionFile, stream_key

    config = load_run_config(args.config)
    data, batch_size = config.data, config.trainer.micro_batch_size
    tokenizer = load_tokenizer(data.tokenizer)

    began = time.perf_counter()
    walking = PackedBatches(data, batch_size, tokenizer=CountingTokenizer(tokenizer))
    walked = next(walking.numbered(args.position))
    walk_seconds = time.perf_counter() - began

    position = DataPosition(finished_below=args.position, point=walking.point_for(args.position))
    with tempfile.TemporaryDirectory() as folder:
        saved = PositionFile(Path(folder) / "trainer.position.json", stream_key(data, batch_size, 0, 1))
        saved.save(position)
        began = time.perf_counter()
        loaded, _ = saved.load()
        resuming = PackedBatches(data, batch_size, tokenizer=CountingTokenizer(tokenizer))
        resuming.points.add(loaded.point)
        resumed = next(resuming.numbered(args.position))
        resume_seconds = time.perf_counter() - began
    return {
        "config": args.config,
        "position": args.position,
        "micro_batch_size": batch_size,
        "seq_len": data.seq_len,
        "tokens_before_position": args.position * batch_size * data.seq_len,
        "sequence_shuffle_buffer": data.sequence_shuffle_buffer,
        "saved_point": {"window": loaded.point.window, "epoch": loaded.point.epoch, "documents": loaded.point.documents},
        "walk_from_start": {"seconds": round(walk_seconds, 2), "documents_tokenized": walking.tokenizer.documents},
        "from_saved_point": {"seconds": round(resume_seconds, 2), "documents_tokenized": resuming.tokenizer.documents},
        "speedup": round(walk_seconds / resume_seconds, 1),
        "same_batch": bool((walked.tokens == resumed.tokens).all() and (walked.labels == resumed.labels).all()),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run_and_print(lambda: measure(args), args.output)


if __name__ == "__main__":
    main()
