"""The run_server.py command line both launchers use (the token travels in AGORA_TOKEN, never in argv)."""

from __future__ import annotations

import dataclasses
import urllib.request

from agora.cli.run_info import RunInfo
from agora.cli.settings import TOKEN_ENV, Settings

SCRIPT = "agora/src/agora/run_server.py"


@dataclasses.dataclass(frozen=True)
class WorkerPlan:
    """What the launchers start: run_server.py arguments plus the environment it needs."""

    args: list[str]
    env: dict[str, str]
    """Variables to add to the worker's environment (the token among them)."""


def worker_plan(s: Settings, run: RunInfo, config_ref: str, batch_size: int | None, config_max_batch: int, public_ip: str | None) -> WorkerPlan:
    args = ["--gpu_id", str(s.gpu_id), "--config", config_ref, "--host_maddrs", f"/ip4/0.0.0.0/tcp/{s.port}"]
    if public_ip:
        args += ["--announce_maddrs", f"/ip4/{public_ip}/tcp/{s.public_port}"]
    if run.auth_server:
        args += ["--auth_server", run.auth_server]
    if run.prom_gateway:
        args += ["--prom_gateway", run.prom_gateway]
    if s.email:
        args += ["--email", s.email]
    args += ["--log_file", s.log_path, "--identity_path", s.key_path]
    if batch_size is not None and batch_size < config_max_batch:
        args += ["--batch_size_override", str(batch_size)]
    if run.seeds:
        args += ["--initial_peers", *run.seeds]  # last: nargs="*" takes everything after it
    env = {TOKEN_ENV: s.token or ""}
    return WorkerPlan(args, env)


def find_public_ip(timeout: float = 3.0) -> str | None:
    """This machine's address as the internet sees it (what other peers must dial); None when offline."""
    try:
        with urllib.request.urlopen("https://api.ipify.org", timeout=timeout) as answer:
            text = answer.read(64).decode("ascii").strip()
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    parts = text.split(".")
    return text if len(parts) == 4 and all(p.isdigit() and int(p) < 256 for p in parts) else None
