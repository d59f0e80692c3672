"""Does the local demo's printed loss fall? Runs the README's main command and reads what its console showed.

Runs ``python3 agora_cli.py --local --steps 300`` (the README's first command, the embedded local-tiny
run) in this checkout and prints one JSON object: the smoothed training loss at every trainer report
(``trainer-summary.json``'s ``smoothed_losses``, the numbers the console's ``[TRAINER]`` lines print),
the largest rise of that loss over its lowest value so far, and ``falls``: split the reports after the
learning-rate warm-up into thirds, each third's mean is lower than the one before (a training loss
follows the text it is fed: a stretch of harder documents lifts it for a while, so single reports are
not compared). Before the data was shuffled across documents the same command printed a loss that fell
to 6.5 and climbed back to 8.1.

Usage:
  .venv/bin/python bench/demo_loss.py --output bench/results/demo-loss.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchlib import run_and_print

REPO = Path(__file__).resolve().parents[1]
SUMMARY = REPO / "logs" / "local" / "trainer-summary.json"
STEPS = 300
WARMUP_MICRO_BATCHES = 20  # local-tiny: 10 warm-up epochs of 8 samples, micro-batches of 4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=STEPS, help=f"the demo's --steps (default {STEPS}, as the README runs it)")
    parser.add_argument("--output", type=Path, help="also write the JSON to this file")
    return parser.parse_args(argv)


def largest_rise(losses: list[float]) -> float:
    """How far the curve ever climbs back above the lowest value it reached before."""
    rise, lowest = 0.0, float("inf")
    for loss in losses:
        lowest = min(lowest, loss)
        rise = max(rise, loss - lowest)
    return rise


def third_means(losses: list[float]) -> list[float]:
    n = len(losses) // 3
    return [sum(part) / len(part) for part in (losses[:n], losses[n : 2 * n], losses[2 * n :])] if n else []


def run(args: argparse.Namespace) -> dict:
    command = [sys.executable, "agora_cli.py", "--local", "--steps", str(args.steps)]
    started = time.perf_counter()
    code = subprocess.run(command, cwd=REPO, stdout=subprocess.DEVNULL).returncode
    seconds = round(time.perf_counter() - started, 1)
    summary = json.loads(SUMMARY.read_text())
    curve = [(step, round(loss, 4)) for step, loss in summary["smoothed_losses"] if loss is not None]
    after_warmup = [loss for step, loss in curve if step > WARMUP_MICRO_BATCHES]
    rise = largest_rise(after_warmup)
    thirds = third_means(after_warmup)
    return {
        "benchmark": "demo_loss",
        "command": " ".join(["python3", *command[1:]]),
        "exit_code": code,
        "seconds": seconds,
        "completed": summary["completed"],
        "smoothed_loss": curve,
        "first_after_warmup": after_warmup[0] if after_warmup else None,
        "last": after_warmup[-1] if after_warmup else None,
        "largest_rise_after_warmup": round(rise, 4),
        "thirds_mean": [round(m, 4) for m in thirds],
        "falls": code == 0 and len(thirds) == 3 and thirds[0] > thirds[1] > thirds[2],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    output = run_and_print(lambda: run(args), args.output)
    return 0 if output["falls"] else 1


if __name__ == "__main__":
    sys.exit(main())
