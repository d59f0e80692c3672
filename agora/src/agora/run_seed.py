"""Agora seed: a long-lived DHT peer that others bootstrap from.

Prints one JSON line with its multiaddrs once it is reachable, then serves until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host_maddrs", nargs="+", default=["/ip4/127.0.0.1/tcp/0"])
    parser.add_argument("--announce_maddrs", nargs="+", default=None)
    parser.add_argument("--identity_path", required=True, help="key file; a fixed identity gives a fixed multiaddr")
    parser.add_argument("--initial_peers", nargs="*", default=[])
    parser.add_argument("--log_file", default=None)
    parser.add_argument("--coordinator_public_key", default=None,
                        help="the run coordinator's public key (it prints it at start; also in /api/run_info), given as "
                             "--coordinator_public_key=KEY since a key may start with '-': the seed then refuses DHT "
                             "records from peers the coordinator did not admit")
    parser.add_argument("--config", default=None, help="the run config (a YAML path or a shipped name); needed with --coordinator_public_key")
    args = parser.parse_args(argv)
    if args.coordinator_public_key and not args.config:
        parser.error("--coordinator_public_key needs --config: the seed must know the run's stage keys")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from agora.signals import stop_on_signals

    stop = stop_on_signals()  # before hivemind loads: a Ctrl+C during the import must still stop cleanly
    from hivemind import DHT

    from agora.membership.identity import ensure_identity
    from agora.processes import setup_process
    from agora_server.p2p_frames import install_frame_limit

    setup_process(args.log_file)
    validators = []
    if args.coordinator_public_key:
        from agora.membership.access import run_record_validator
        from agora.config import ConfigError, load_run_config
        from agora_server.access import AccessTokenError

        try:
            validators = [run_record_validator(load_run_config(args.config), args.coordinator_public_key)]
        except (ConfigError, AccessTokenError) as e:
            print(f"[SEED] {e}", file=sys.stderr)
            return 2
    install_frame_limit()  # before the DHT forks its processes: they keep it
    dht = DHT(
        initial_peers=args.initial_peers,
        host_maddrs=args.host_maddrs,
        announce_maddrs=args.announce_maddrs,
        identity_path=str(ensure_identity(args.identity_path)),
        record_validators=validators,
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
