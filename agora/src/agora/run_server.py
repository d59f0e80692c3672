"""Agora worker: hosts one pipeline stage on this GPU (or CPU, if the run config allows it).

Example (local swarm member):
  python3 agora/src/agora/run_server.py --config local-tiny --stage head \\
      --host_maddrs /ip4/127.0.0.1/tcp/0 --initial_peers /ip4/127.0.0.1/tcp/40000/p2p/Qm...
"""

from __future__ import annotations

import sys

from agora.peer_options import WorkerOptions
from agora.signals import stop_on_signals


def parse_args(argv: list[str] | None = None) -> WorkerOptions:
    # parsed before torch is imported, so --help and argument errors are instant
    return WorkerOptions.parse(argv, description=__doc__)


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    stop_on_signals()  # before torch and numpy load: a Ctrl+C during their import must still stop cleanly
    from agora.worker.run import run_worker

    return run_worker(options)


if __name__ == "__main__":
    sys.exit(main())
