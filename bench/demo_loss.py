"""Does the local demo's printed loss fall? Runs the README's main command and reads what its console showed.

Runs ``python3 agora_cli.py --local --steps 300`` (the README's first command, the embedded local-tiny
run) in this checkout and prints one JSON object: the smoothed training loss at every trainer report
(``trainer-summary.json``'s ``smoothed_losses``, the numbers the console's ``[TRAINER]`` lines print),
the largest rise of that loss over its lowest value so far, and ``falls``: after the first report past
the learning-rate warm-up, the smoothed loss never rises more than ``--tolerance`` nats above the lowest
value it has reached, and it ends lower than it was then. Before the data was shuffled across documents
the same command printed a loss that fell to 6.5 and climbed back to 8.1.

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
    parser.add_argument("--tolerance", type=float, default=0.1, help="nats the smoothed loss may rise above its lowest value so far (default 0.1)")
    parser.add_argument("--output", type=Path, help="also write the JSON to this file")
    return parser.parse_args(argv)


def largest_rise(losses: list[float]) -> float:
    """How far the curve ever climbs back above the lowest value it reached before."""
    rise, lowest = 0.0, float("inf")
    for loss in losses:
        lowest = min(lowest, loss)
        rise = max(rise, loss - lowest)
    return rise


def run(args: argparse.Namespace) -> dict:
    command = [sys.executable, "agora_cli.py", "--local", "--steps", str(args.steps)]
    started = time.perf_counter()
    code = subprocess.run(command, cwd=REPO, stdout=subprocess.DEVNULL).returncode
    seconds = round(time.perf_counter() - started, 1)
    summary = json.loads(SUMMARY.read_text())
    curve = [(step, round(loss, 4)) for step, loss in summary["smoothed_losses"] if loss is not None]
    after_warmup = [loss for step, loss in curve if step > WARMUP_MICRO_BATCHES]
    rise = largest_rise(after_warmup)
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
        "tolerance": args.tolerance,
        "falls": bool(after_warmup) and code == 0 and rise <= args.tolerance and after_warmup[-1] < after_warmup[0],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    output = run_and_print(lambda: run(args), args.output)
    return 0 if output["falls"] else 1


if __name__ == "__main__":
    sys.exit(main())
