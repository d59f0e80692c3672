"""`python3 agora_cli.py` for a participant: settings → preflight → native or Docker launch."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from agora.cli import preflight, settings as store
from agora.cli.run_file import DEFAULT_RUN_FILE, REPO, RunFileError, load_run_file
from agora.cli.settings import SettingsError
from agora.cli.troubleshooting import KnownError
from agora.cli.wizard import SetupCancelled, resolve

MARKS = {preflight.OK: "ok  ", preflight.WARN: "WARN", preflight.FAIL: "FAIL"}


def say(line: str) -> None:
    print(line, flush=True)


def error(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def show_check(result: preflight.CheckResult) -> None:
    say(f"[PREFLIGHT] {MARKS[result.status]} {result.name:<10} {result.message}")
    if result.fix and result.status != preflight.OK:
        say(f"[PREFLIGHT]      {'':<10} → {result.fix}")


def participate(args: argparse.Namespace) -> int:
    try:
        run = load_run_file(args.run_json or DEFAULT_RUN_FILE)
        settings = resolve(args, say)
    except SetupCancelled as e:
        error(f"[SETUP] {e}")
        return e.exit_code
    except (RunFileError, SettingsError) as e:
        fix = _fix_for(e)
        error(f"[SETUP] {e}" + (f"\n[SETUP] {fix}" if fix else ""))
        return 2
    from agora.cli.memory_plan import disk_needed, largest_batch_everywhere
    from agora.config import ConfigError, load_run_config  # slow (torch): only once the questions are answered

    try:
        config = load_run_config(run.config_ref)
    except ConfigError as e:
        error(f"[SETUP] {e}")
        return 2

    workdir = Path.cwd()
    report = preflight.run_preflight(
        preflight.PreflightInput(
            gpu_id=settings.gpu_id,
            port=settings.port,
            use_docker=settings.use_docker,
            allow_cpu=config.server.allow_cpu,
            config_max_batch=config.server.max_batch_size,
            batch_for_vram=lambda vram: largest_batch_everywhere(config, vram),
            batch_size_override=settings.batch_size_override,
            seeds=run.seeds,
            gpus_on_machine=max(1, len(store.saved_gpu_ids())),
            workdir=workdir,
            constraints=REPO / "constraints.txt",
            auth_server=run.auth_server,
            run_file=run.path,
            disk_bytes=disk_needed(config),
        ),
        emit=show_check,
    )
    if report.failed:
        error(f"[PREFLIGHT] {len(report.failed)} check(s) failed; the worker was not started.")
        return 1
    if args.preflight_only:
        say("[PREFLIGHT] All checks passed. --preflight_only: the worker was not started.")
        return 0

    from agora.cli.worker_command import find_public_ip, worker_options

    public_ip = find_public_ip()
    if public_ip is None:
        say("[NETWORK] Could not look up this machine's public IP; peers will dial the addresses the worker detects itself.")
    if settings.use_docker:
        from agora.cli.docker_launch import DockerLaunchError, launch_in_docker

        options = worker_options(settings, run, run.run_config, report.batch_size, config.server.max_batch_size, public_ip)
        try:
            return launch_in_docker(settings, options, say)
        except DockerLaunchError as e:
            error(f"[DOCKER] {e}")
            return 1

    from agora.cli.native import NativeRun

    options = worker_options(settings, run, run.config_ref, report.batch_size, config.server.max_batch_size, public_ip)
    log_file = (workdir / settings.log_path).resolve()
    return NativeRun(options, settings.gpu_id, log_file, workdir, REPO, say=say, run_file=run.path).run()


def _fix_for(e: Exception) -> str:
    # SettingsError messages come from the table; attach the matching entry's fix
    from agora.cli import troubleshooting

    for known in troubleshooting.TABLE:
        if isinstance(known, KnownError) and known.source == "cli" and known.pattern().match(str(e)):
            return known.fix
    return ""
