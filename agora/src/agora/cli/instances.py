"""The workers this machine runs: one small 0600 state file per GPU under ~/.agora, read by status and stop.

The launcher writes it when it starts a worker and adds the exit code when the worker ends; ``stop``
marks the stop as the participant's own request before it signals the worker, so the launcher can
say so instead of reporting a failure. What the worker is doing comes from the worker itself
(``agora.worker.status``: the status file beside its log).
"""

from __future__ import annotations

import dataclasses
import json
import os
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
    exit_code: int | None = None
    """Set by the launcher when the worker has ended."""
    stop_requested: bool = False
    """``agora_cli.py stop`` asked it to stop: an exit then is the participant's doing, not a failure."""


def state_path(gpu_id: int) -> Path:
    return agora_home() / f"instance_gpu{gpu_id}.json"


def record(instance: Instance) -> Path:
    path = state_path(instance.gpu_id)
    write_private_json(path, dataclasses.asdict(instance))
    return path


def forget(gpu_id: int) -> None:
    state_path(gpu_id).unlink(missing_ok=True)


def recorded_for(gpu_id: int) -> Instance | None:
    return next((i for i in recorded() if i.gpu_id == gpu_id), None)


def update(gpu_id: int, **changes) -> Instance | None:
    """Change fields of the GPU's record, if it still has one."""
    current = recorded_for(gpu_id)
    if current is None:
        return None
    changed = dataclasses.replace(current, **changes)
    record(changed)
    return changed


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
