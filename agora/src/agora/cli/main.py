"""Agora command line (run through ``python3 agora_cli.py``).

Examples:
  python3 agora_cli.py                              # guided setup, checks, then join the run (settings reused next time)
  python3 agora_cli.py --gpu_id 1                   # a second instance for GPU 1 (port 49201, its own key and log)
  python3 agora_cli.py --skip_input --token -       # no questions (scripts, agents): the token from stdin, or set AGORA_TOKEN
  python3 agora_cli.py --reconfigure                # answer every question again
  python3 agora_cli.py status                       # the workers on this machine
  python3 agora_cli.py stop [--gpu_id N]            # stop them
  python3 agora_cli.py --local                      # a whole swarm on this machine, until Ctrl+C
  python3 agora_cli.py --local --steps 300          # stop after 300 trained micro-batches
  python3 agora_cli.py --local --workers-per-stage 2
  python3 agora_cli.py memory-plan --config llama-8b --vram-gib 24   # GPU and host memory per stage
  python3 agora_cli.py export --config llama-8b --checkpoints DIR --out DIR   # the model as a Hugging Face Llama
  python3 agora_cli.py test [pytest args]           # the test suite
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from agora.peer_options import DEFAULT_PORT, TOKEN_ENV, default_identity_path, default_log_file

REPO = Path(__file__).resolve().parents[4]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agora_cli.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    participant = parser.add_argument_group("joining a run (flags of the participant guide)")
    participant.add_argument("--gpu_id", type=int, default=None, help="GPU to use (default: 0)")
    participant.add_argument("--token", default=None, help=f"HuggingFace token (saved with mode 0600, never printed); '-' reads it from stdin, and without the flag {TOKEN_ENV} is used if set")
    participant.add_argument("--email", default=None, help="email address (optional)")
    participant.add_argument("--host_port", type=_port, default=None, help=f"listening port (default: {DEFAULT_PORT} + gpu_id)")
    participant.add_argument("--announce_port", type=_port, default=None, help="external port, if different from host_port (e.g. on RunPod)")
    participant.add_argument("--use_docker", action="store_true", help="run inside Docker")
    participant.add_argument("--log_file", default=None, help=f"log file path (default: {default_log_file('<ID>')})")
    participant.add_argument("--identity_path", default=None, help=f"identity key path (default: {default_identity_path('<ID>')})")
    participant.add_argument("--batch_size_override", type=_positive, default=None, help="lower the batch size (only if the GPU runs out of memory)")
    participant.add_argument("--skip_input", action="store_true", help="never prompt: values come from flags or saved settings")
    participant.add_argument("--reconfigure", action="store_true", help="ask every question again")
    participant.add_argument("--preflight_only", action="store_true", help="set up and run the checks, then stop without starting the worker")
    participant.add_argument("--run_json", default=None, help="the run to join (default: run.json in the repository)")
    participant.add_argument("--any_token", action="store_true", help="accept a token that does not look like a HuggingFace one (runs with their own token file)")
    parser.add_argument("--local", action="store_true", help="run a seed, workers and a trainer on 127.0.0.1 (CPU)")
    parser.add_argument("--config", default="local-tiny", help="run config for --local (default: local-tiny)")
    parser.add_argument("--steps", type=int, default=0, help="with --local: stop after N completed micro-batches (0: until Ctrl+C)")
    parser.add_argument("--workers-per-stage", type=int, default=1, help="with --local: workers serving each stage")
    parser.add_argument("--no-coordinator", action="store_true", help="with --local: assign stages directly instead of through a local coordinator")
    parser.add_argument("--verbose", action="store_true", help="with --local: show every process's lines, not just the trainer's progress (the logs in logs/local/ have everything either way)")
    return parser


def _port(text: str) -> int:
    from agora.ports import parse_port

    try:
        return parse_port(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def run_tests(pytest_args: list[str]) -> int:
    from agora.cli.system_tools import ensure_test_tools

    ensure_test_tools()
    return subprocess.call([sys.executable, "-m", "pytest", *(pytest_args or ["tests"])], cwd=REPO)


LOCAL_LOG_DIR = Path("logs/local")


def run_local(args: argparse.Namespace) -> int:
    from agora.processes import stop_on_signals

    stop = stop_on_signals()  # before the slow imports: a Ctrl+C during them still stops cleanly
    goal = f"{args.steps} micro-batches" if args.steps else "until Ctrl+C"
    parts = "seed, " + ("" if args.no_coordinator else "coordinator, ") + f"{args.workers_per_stage} worker(s) per stage, one trainer"
    print(f"[LOCAL] Starting a local swarm (run config {args.config}, {goal}): {parts}. Logs: {LOCAL_LOG_DIR}/. Stop with Ctrl+C.",
          flush=True)

    from agora.config import ConfigError, load_run_config
    from agora.local_console import SwarmConsole, outcome_line
    from agora.local_swarm import LocalSwarm, SwarmError
    from agora_server.telemetry import events as ev

    try:
        config = load_run_config(args.config)
    except ConfigError as e:
        print(f"[LOCAL] {e}", file=sys.stderr)
        return 2
    console = SwarmConsole(sys.stdout, verbose=args.verbose)
    # worker checkpoints belong to this run too: beside its logs, deleted with them by the next run
    overrides = {"server": {"checkpoint_dir": str((LOCAL_LOG_DIR / "checkpoints").resolve())}}
    swarm = LocalSwarm(args.config, config, workers_per_stage=args.workers_per_stage, steps=args.steps, log_dir=LOCAL_LOG_DIR,
                       coordinator=not args.no_coordinator, console=console, die_with_launcher=True, config_overrides=overrides)
    code, failure = 1, None
    try:
        swarm.start()
        trainer_code = swarm.wait_for_trainer(stop)
        code = 0 if trainer_code in (0, None) else trainer_code
    except SwarmError as e:
        failure = str(e)
    finally:
        console.say("[LOCAL] Stopping the swarm...")
        leftovers = swarm.stop()
    if leftovers:
        print(f"[LOCAL] Processes still running after shutdown: {', '.join(leftovers)}", file=sys.stderr)
        return 1
    if failure is not None:
        console.say(f"[LOCAL] The swarm did not start: {failure}.")
        return 1
    finished = swarm.events_of("trainer", ev.TrainerFinished)
    errors = swarm.events_of("trainer", ev.ProcessError)
    summary = swarm.summary_path if swarm.summary_path.exists() else None
    dashboard = swarm.dashboard_copy if swarm.dashboard_copy.exists() else None
    console.say(outcome_line(finished[-1] if finished else None, trainer_code=swarm.process("trainer").popen.returncode,
                             stopped_by_user=stop.is_set(), log_dir=f"{LOCAL_LOG_DIR}/", summary=summary and str(summary),
                             dashboard=dashboard and str(dashboard), trainer_error=errors[-1].message if errors else None))
    return code


def main(argv: list[str]) -> int:
    if argv[:1] == ["test"]:
        return run_tests(argv[1:])
    if argv[:1] == ["memory-plan"]:
        from agora.cli.memory_plan import main as memory_plan_main

        return memory_plan_main(argv[1:])
    if argv[:1] == ["export"]:
        from agora.cli.export import main as export_main

        return export_main(argv[1:])
    if argv[:1] in (["status"], ["stop"]):
        from agora.cli.manage import main as manage_main

        return manage_main(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.workers_per_stage < 1:
        parser.error("--workers-per-stage must be at least 1")
    if args.local:
        return run_local(args)
    from agora.cli.participate import participate

    return participate(args)
