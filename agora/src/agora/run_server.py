"""Agora worker: hosts one pipeline stage on this GPU (or CPU, if the run config allows it).

Example (local swarm member):
  python3 agora/src/agora/run_server.py --config local-tiny --stage head \\
      --host_maddrs /ip4/127.0.0.1/tcp/0 --initial_peers /ip4/127.0.0.1/tcp/40000/p2p/Qm...
"""

from __future__ import annotations

import argparse
import sys

from agora.signals import stop_on_signals


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # parsed before torch is imported, so --help and argument errors are instant
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu_id", type=int, default=0, help="GPU index; also names the default key and log files")
    parser.add_argument("--config", required=True, help="run config: a YAML path or a shipped name (local-tiny, llama-8b)")
    parser.add_argument("--token", default=None, help="HuggingFace token used to authorise with the coordinator")
    parser.add_argument("--auth_server", default=None, help="coordinator URL")
    parser.add_argument("--prom_gateway", default=None, help="Prometheus Pushgateway address")
    parser.add_argument("--host_maddrs", nargs="+", default=None, help="multiaddrs to listen on (default /ip4/0.0.0.0/tcp/49200+gpu_id)")
    parser.add_argument("--announce_maddrs", nargs="+", default=None, help="multiaddrs other peers should dial")
    parser.add_argument("--initial_peers", nargs="*", default=[], help="multiaddrs of the run's seeds")
    parser.add_argument("--email", default=None, help="optional contact email")
    parser.add_argument("--log_file", default=None, help="verbose log file (default logs/server_gpu<ID>.log)")
    parser.add_argument("--identity_path", default=None, help="private key file (default private_gpu<ID>.key)")
    parser.add_argument("--batch_size_override", type=int, default=None, help="lower the micro-batch limit (e.g. after CUDA out of memory)")
    parser.add_argument("--stage", default=None, help="stage to host in a run without a coordinator (with --auth_server the coordinator assigns it)")
    parser.add_argument("--auth_timeout", type=float, default=4 * 3600, help="seconds to wait in the authorization queue")
    parser.add_argument("--heartbeat_interval", type=float, default=30.0, help="seconds between progress reports to the coordinator")
    args = parser.parse_args(argv)
    if args.auth_server and args.stage:
        parser.error("--stage is for runs without a coordinator; with --auth_server the coordinator assigns the stage")
    if args.batch_size_override is not None and args.batch_size_override < 1:
        parser.error("--batch_size_override must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop_on_signals()  # before torch and numpy load: a Ctrl+C during their import must still stop cleanly
    from agora.worker import run_worker

    return run_worker(args)


if __name__ == "__main__":
    sys.exit(main())
