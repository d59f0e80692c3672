"""Agora trainer: tokenises the run's dataset and drives micro-batches through the pipeline.

Example:
  python -m agora.trainer --config local-tiny --initial_peers /ip4/127.0.0.1/tcp/40000/p2p/Qm... --steps 100
"""

from __future__ import annotations

import sys

from agora.peer_options import TrainerOptions


def parse_args(argv: list[str] | None = None) -> TrainerOptions:
    return TrainerOptions.parse(argv, description=__doc__)


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    from agora.trainer.run import run_trainer

    return run_trainer(options)


if __name__ == "__main__":
    sys.exit(main())
