"""The verbose file log (``logs/server_gpu<ID>.log``): every event and library warning, rotated."""

from __future__ import annotations

import dataclasses
import logging
import logging.handlers
from pathlib import Path

from agora_server.telemetry.events import Event

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def open_file_log(path: str | Path, *, max_bytes: int = 20 * 2**20, backups: int = 3) -> logging.Handler:
    """Send the root logger (hivemind, torch, ours) to a rotating file; return the handler."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.handlers.RotatingFileHandler(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
    handler.setFormatter(logging.Formatter(_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    return handler


class EventLogger:
    """EventBus subscriber that records every event as one structured line."""

    def __init__(self, name: str = "agora.events"):
        self.logger = logging.getLogger(name)

    def __call__(self, event: Event) -> None:
        fields = " ".join(f"{f.name}={getattr(event, f.name)!r}" for f in dataclasses.fields(event) if f.name != "time")
        self.logger.info("%s %s", type(event).__name__, fields)
