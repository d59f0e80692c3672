"""Agora seed: a long-lived DHT peer that others bootstrap from.

Prints one JSON line with its multiaddrs once it is reachable, then serves until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host_maddrs", nargs="+", default=["/ip4/127.0.0.1/tcp/0"])
    parser.add_argument("--announce_maddrs", nargs="+", default=None)
    parser.add_argument("--identity_path", required=True, help="key file; a fixed identity gives a fixed multiaddr")
    parser.add_argument("--initial_peers", nargs="*", default=[])
    parser.add_argument("--log_file", default=None)
    args = parser.parse_args(argv)

    from hivemind import DHT

    from agora.identity import ensure_identity
    from agora.processes import setup_process, stop_on_signals

    setup_process(args.log_file)
    stop = stop_on_signals()
    dht = DHT(
        initial_peers=args.initial_peers,
        host_maddrs=args.host_maddrs,
        announce_maddrs=args.announce_maddrs,
        identity_path=str(ensure_identity(args.identity_path)),
        start=True,
    )
    try:
        maddrs = [str(m) for m in dht.get_visible_maddrs()]
        print(json.dumps({"seed_maddrs": maddrs}), flush=True)
        stop.wait()
    finally:
        dht.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
