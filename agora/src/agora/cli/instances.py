"""The workers this machine runs: one small 0600 state file per GPU under ~/.agora, read by status and stop."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

from agora.cli.settings import agora_home, write_private_json

NATIVE, DOCKER = "native", "docker"


@dataclasses.dataclass(frozen=True)
class Instance:
    gpu_id: int
    mode: str
    log_file: str
    """Absolute path of the worker's log file."""
    pid: int | None = None
    pgid: int | None = None
    container: str | None = None


def state_path(gpu_id: int) -> Path:
    return agora_home() / f"instance_gpu{gpu_id}.json"


def record(instance: Instance) -> Path:
    path = state_path(instance.gpu_id)
    write_private_json(path, dataclasses.asdict(instance))
    return path


def forget(gpu_id: int) -> None:
    state_path(gpu_id).unlink(missing_ok=True)


def recorded() -> list[Instance]:
    found = []
    for path in sorted(agora_home().glob("instance_gpu*.json")):
        try:
            found.append(Instance(**json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, ValueError, TypeError):
            continue  # a half-written or foreign file: status shows the others
    return sorted(found, key=lambda i: i.gpu_id)


def native_alive(instance: Instance) -> bool:
    """True while the worker's process group still has a member."""
    if instance.pgid is None:
        return False
    try:
        os.killpg(instance.pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


# The console form ([SERVER] ..., [PROGRESS] ...) and the file log's event records carry the same facts.
_STAGE = (re.compile(r"\[SERVER\] Serving stage (\S+) as"), re.compile(r"(?:ServerStarted|AccessGranted) .*?stage='([^']+)'"))
_CONTRIBUTION = (re.compile(r"\[PROGRESS\] Your contribution: (\d+) samples"), re.compile(r"ProgressReport .*?contribution_samples=(\d+)"))


@dataclasses.dataclass(frozen=True)
class LogFacts:
    stage: str | None
    contribution: int | None


def read_log_facts(path: str | Path, tail_bytes: int = 4 * 2**20) -> LogFacts:
    """The latest stage and contribution in the log (its last few MB; the worker's log rotates anyway)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - tail_bytes))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return LogFacts(None, None)
    stage = contribution = None
    for line in text.splitlines():
        for pattern in _STAGE:
            if m := pattern.search(line):
                stage = m.group(1)
        for pattern in _CONTRIBUTION:
            if m := pattern.search(line):
                contribution = int(m.group(1))
    return LogFacts(stage, contribution)
