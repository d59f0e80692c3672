"""Agora seed: a long-lived DHT peer that others bootstrap from.

Says the multiaddrs it is reachable at (a SeedListening event: [SEED] lines), then serves until SIGINT/SIGTERM.
"""

from __future__ import annotations

import sys

from agora.peer_options import SeedOptions


def parse_args(argv: list[str] | None = None) -> SeedOptions:
    return SeedOptions.parse(argv, description=__doc__)


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    from agora.signals import stop_on_signals

    stop = stop_on_signals()  # before hivemind loads: a Ctrl+C during the import must still stop cleanly
    from hivemind import DHT

    from agora.membership.identity import ensure_identity
    from agora.processes import setup_process
    from agora_server.p2p_frames import install_frame_limit
    from agora_server.telemetry.events import SeedListening

    events = setup_process(options.log_file)
    validators = []
    if options.coordinator_public_key:
        from agora.membership.access import run_record_validator
        from agora.config import ConfigError, load_run_config
        from agora_server.access import AccessTokenError

        try:
            validators = [run_record_validator(load_run_config(options.config), options.coordinator_public_key)]
        except (ConfigError, AccessTokenError) as e:
            print(f"[SEED] {e}", file=sys.stderr)
            return 2
    install_frame_limit()  # before the DHT forks its processes: they keep it
    dht = DHT(
        initial_peers=options.initial_peers,
        host_maddrs=options.host_maddrs,
        announce_maddrs=options.announce_maddrs,
        identity_path=str(ensure_identity(options.identity_path)),
        record_validators=validators,
        start=True,
    )
    try:
        events.emit(SeedListening(maddrs=tuple(str(m) for m in dht.get_visible_maddrs())))
        stop.wait()
    finally:
        dht.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
