"""The worker both launchers start: its run_server.py options (the token goes in its environment, never in argv)."""

from __future__ import annotations

import urllib.request

from agora.cli.run_file import RunFile
from agora.cli.settings import Settings
from agora.peer_options import WorkerOptions

SCRIPT = "agora/src/agora/run_server.py"


def worker_options(s: Settings, run: RunFile, config_ref: str, batch_size: int | None, config_max_batch: int, public_ip: str | None) -> WorkerOptions:
    """Launchers run ``SCRIPT`` with ``to_argv()`` and add ``to_env()`` to its environment."""
    return WorkerOptions(
        gpu_id=s.gpu_id,
        config=config_ref,
        token=s.token,
        auth_server=run.auth_server,
        prom_gateway=run.prom_gateway,
        host_maddrs=(f"/ip4/0.0.0.0/tcp/{s.port}",),
        announce_maddrs=(f"/ip4/{public_ip}/tcp/{s.public_port}",) if public_ip else None,
        initial_peers=tuple(run.seeds),
        email=s.email or None,
        log_file=s.log_path,
        identity_path=s.key_path,
        batch_size_override=batch_size if batch_size is not None and batch_size < config_max_batch else None,
    )


def find_public_ip(timeout: float = 3.0) -> str | None:
    """This machine's address as the internet sees it (what other peers must dial); None when offline."""
    try:
        with urllib.request.urlopen("https://api.ipify.org", timeout=timeout) as answer:
            text = answer.read(64).decode("ascii").strip()
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    parts = text.split(".")
    return text if len(parts) == 4 and all(p.isdigit() and int(p) < 256 for p in parts) else None
