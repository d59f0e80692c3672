"""Agora command line (run through ``python3 agora_cli.py``).

Examples:
  python3 agora_cli.py --local                      # a whole swarm on this machine, until Ctrl+C
  python3 agora_cli.py --local --steps 300          # stop after 300 trained micro-batches
  python3 agora_cli.py --local --workers-per-stage 2
  python3 agora_cli.py test [pytest args]           # the test suite
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[4]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agora_cli.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--local", action="store_true", help="run a seed, workers and a trainer on 127.0.0.1 (CPU)")
    parser.add_argument("--config", default="local-tiny", help="run config for --local (default: local-tiny)")
    parser.add_argument("--steps", type=int, default=0, help="with --local: stop after N completed micro-batches (0: until Ctrl+C)")
    parser.add_argument("--workers-per-stage", type=int, default=1, help="with --local: workers serving each stage")
    parser.add_argument("--no-coordinator", action="store_true", help="with --local: assign stages directly instead of through a local coordinator")
    return parser


def run_tests(pytest_args: list[str]) -> int:
    from agora.cli.system_tools import ensure_test_tools

    ensure_test_tools()
    return subprocess.call([sys.executable, "-m", "pytest", *(pytest_args or ["tests"])], cwd=REPO)


def run_local(args: argparse.Namespace) -> int:
    from agora.config import ConfigError, load_run_config
    from agora.local_swarm import LocalSwarm, SwarmError
    from agora.processes import stop_on_signals

    try:
        config = load_run_config(args.config)
    except ConfigError as e:
        print(f"[LOCAL] {e}", file=sys.stderr)
        return 2
    stages = ", ".join(s.name for s in config.stages)
    print(
        f"[LOCAL] Starting a local swarm of run {config.run_name}: seed, {'' if args.no_coordinator else 'coordinator, '}{args.workers_per_stage} worker(s) per stage"
        f" ({stages}), one trainer. Logs: logs/local/. Stop with Ctrl+C.",
        flush=True,
    )
    stop = stop_on_signals()
    swarm = LocalSwarm(args.config, config, workers_per_stage=args.workers_per_stage, steps=args.steps, coordinator=not args.no_coordinator)
    code = 1
    try:
        swarm.start()
        trainer_code = swarm.wait_for_trainer(stop)
        code = 0 if trainer_code in (0, None) else trainer_code
    except SwarmError as e:
        print(f"[LOCAL] {e}", file=sys.stderr)
    finally:
        print("[LOCAL] Stopping the swarm...", flush=True)
        leftovers = swarm.stop()
    if leftovers:
        print(f"[LOCAL] Processes still running after shutdown: {', '.join(leftovers)}", file=sys.stderr)
        return 1
    print("[LOCAL] Swarm stopped; no process left running.", flush=True)
    return code


def main(argv: list[str]) -> int:
    if argv[:1] == ["test"]:
        return run_tests(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.workers_per_stage < 1:
        parser.error("--workers-per-stage must be at least 1")
    if args.local:
        return run_local(args)
    parser.print_help()
    print("\nThe guided participant setup is not available yet; try --local for a swarm on this machine.")
    return 0
