"""A worker's state where `agora_cli.py status` can read it: a small JSON file beside its log.

The worker keeps it current from its own events (``WorkerStatusWriter`` is one more subscriber), so
status shows what the worker is doing (joining, queued, downloading, warming up, training, stopping)
and, once it has ended, why — for native and Docker workers alike, since the log directory is shared.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from pathlib import Path

from agora_server.telemetry import events as ev

STARTING, JOINING, QUEUED, DOWNLOADING, ADMITTED = "starting", "joining", "queued", "downloading", "admitted"
WARMING_UP, TRAINING, STOPPING, FAILED = "warming up", "training", "stopping", "failed"


def status_path_for(log_file: str | Path) -> Path:
    """``logs/server_gpu0.log`` → ``logs/server_gpu0.status.json``."""
    log_file = Path(log_file)
    return log_file.with_name(log_file.stem + ".status.json")


@dataclasses.dataclass
class WorkerStatus:
    state: str = STARTING
    pid: int = 0
    stage: str | None = None
    peer_id: str | None = None
    username: str | None = None
    dashboard_url: str | None = None
    queue_position: int | None = None
    contribution_samples: int | None = None
    message: str | None = None
    """Why it stopped or failed, in the worker's words."""
    updated_at: float = 0.0


def read_status(path: str | Path) -> WorkerStatus | None:
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        known = {f.name for f in dataclasses.fields(WorkerStatus)}
        return WorkerStatus(**{k: v for k, v in raw.items() if k in known})
    except (OSError, ValueError, TypeError):
        return None


class WorkerStatusWriter:
    """EventBus subscriber: folds the worker's events into ``WorkerStatus`` and rewrites the file
    atomically whenever something a participant would want to know changes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.status = WorkerStatus(pid=os.getpid())
        self._lock = threading.Lock()
        self._write()

    def __call__(self, event: ev.Event) -> None:
        s = self.status
        with self._lock:
            if isinstance(event, ev.JoiningRun):
                s.state = JOINING
            elif isinstance(event, ev.AuthQueued):
                s.state, s.queue_position = QUEUED, event.position
            elif isinstance(event, ev.DownloadProgress):
                s.state = DOWNLOADING
            elif isinstance(event, ev.DownloadComplete):
                s.state = QUEUED
            elif isinstance(event, ev.AccessGranted):
                s.state, s.stage, s.username, s.dashboard_url, s.queue_position = ADMITTED, event.stage, event.username, event.dashboard_url, None
            elif isinstance(event, ev.ServerStarted):
                s.state, s.stage, s.peer_id = TRAINING, event.stage, event.peer_id
            elif isinstance(event, ev.WarmupStarted):
                s.state = WARMING_UP
            elif isinstance(event, ev.WarmupComplete):
                s.state = TRAINING
            elif isinstance(event, ev.ProgressReport):
                s.contribution_samples = event.contribution_samples
            elif isinstance(event, ev.HealthStop):
                s.state, s.message = STOPPING, event.message
            elif isinstance(event, ev.ServerStopping):
                s.state = STOPPING
                s.message = s.message or event.reason
            elif isinstance(event, ev.ProcessError):
                s.state, s.message = FAILED, event.message
            else:
                return
            self._write()

    def _write(self) -> None:
        self.status.updated_at = time.time()
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(dataclasses.asdict(self.status)), encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError:
            pass  # a status file is a convenience: a full disk must not stop the worker
