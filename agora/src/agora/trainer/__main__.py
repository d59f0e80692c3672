"""Agora trainer: tokenises the run's dataset and drives micro-batches through the pipeline.

Example:
  python -m agora.trainer --config local-tiny --initial_peers /ip4/127.0.0.1/tcp/40000/p2p/Qm... --steps 100
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="run config: a YAML path or a shipped name")
    parser.add_argument("--initial_peers", nargs="+", required=True, help="multiaddrs of the run's seeds")
    parser.add_argument("--steps", type=int, default=0, help="stop after this many completed micro-batches (0: until Ctrl+C)")
    parser.add_argument("--rank", type=int, default=0, help="this trainer's data shard")
    parser.add_argument("--world_size", type=int, default=1, help="number of trainers sharing the dataset")
    parser.add_argument("--host_maddrs", nargs="+", default=["/ip4/127.0.0.1/tcp/0"])
    parser.add_argument("--summary_path", default=None, help="write the final ledger and loss curve here as JSON")
    parser.add_argument("--log_file", default=None)
    parser.add_argument("--prom_gateway", default=None, help="Prometheus Pushgateway address (host:port) for the trainer's metrics")
    parser.add_argument("--auth_server", default=None, help="the run's coordinator URL; workers of a run with one serve only trainers it admitted")
    parser.add_argument("--token", default=None, help="an operator's HuggingFace token for --auth_server (or set AGORA_TOKEN)")
    parser.add_argument("--identity_path", default="private_trainer.key", help="the trainer's key file; its peer id is what the coordinator admits")
    parser.add_argument("--data_position", default=None,
                        help="file that keeps this trainer's place in its data stream, so a restart continues there "
                             "(default: beside the identity file, <identity name>.position.json)")
    args = parser.parse_args(argv)
    if not 0 <= args.rank < args.world_size:
        parser.error("--rank must be in [0, world_size)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from agora.trainer.run import run_trainer

    return run_trainer(args)


if __name__ == "__main__":
    sys.exit(main())
