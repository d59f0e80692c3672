"""Uploading a worker's checkpoint to the coordinator, on a thread and a connection of its own.

A head or tail checkpoint with its optimizer state is about 23 GB: 15 minutes at 200 Mbit/s, longer
than the renewal margin of an access token. Heartbeats and renewals therefore never wait for it: the
session hands the file over and goes on. Only the newest checkpoint waiting is kept (an older one
that has not started yet is never sent), a failed upload is tried again after a doubling wait unless
a newer checkpoint has arrived meanwhile, and progress (bytes, MB/s, ETA) is reported while it runs.

Uploads are resumable: each file gets an upload id, and a try after a dropped connection first asks
the coordinator how much of it arrived, then sends only the rest. The file stays open from the first
try to the last, so the bytes continued are those of the file begun even after the worker has
rotated its checkpoints (the handle keeps the file it opened, even once renamed or deleted).
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from agora.membership.client import AdmissionError, CoordinatorClient, CoordinatorUnavailable, UploadOutOfStep
from agora.protocol import AccessAnswer, UploadStatus
from agora_server.telemetry import events as ev

CHUNK_BYTES = 4 * 2**20
"""Bytes read and sent at a time: the memory an upload holds, whatever the checkpoint's size."""
_FIRST_RETRY_S, _MAX_RETRY_S = 5.0, 300.0


@dataclasses.dataclass
class _Upload:
    """One checkpoint file on its way, across the tries it takes."""

    path: Path
    epoch: int
    file: BinaryIO
    size: int
    upload_id: str = dataclasses.field(default_factory=lambda: secrets.token_hex(16))


class CheckpointUploader:
    def __init__(
        self,
        client: CoordinatorClient,
        access: Callable[[], AccessAnswer],
        emit: Callable[[ev.Event], None],
        *,
        progress_every: float = 10.0,
        chunk_bytes: int = CHUNK_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ):
        """``client``: a connection of the uploader's own (``CoordinatorClient.separate``), so a long
        upload never holds the one heartbeats go through. ``access``: the node's access as the session
        keeps it renewed, read at the start of each upload."""
        self.client, self.access, self.emit = client, access, emit
        self.progress_every, self.chunk_bytes, self.clock = progress_every, chunk_bytes, clock
        self._pending: tuple[Path, int] | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="checkpoint-upload", daemon=True)
        self.uploads = 0

    def start(self) -> None:
        self._thread.start()

    def submit(self, path: Path, epoch: int) -> None:
        """Send this checkpoint next (replacing one that waits and has not started)."""
        with self._lock:
            self._pending = (path, epoch)
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop, abandoning an upload in progress (the coordinator drops its part once it expires)."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.client.close()

    def _take(self) -> tuple[Path, int] | None:
        with self._lock:
            pending, self._pending = self._pending, None
        return pending

    def _loop(self) -> None:
        retry_wait = 0.0
        current: _Upload | None = None
        try:
            while not self._stop.is_set():
                self._wake.wait(retry_wait or None)
                self._wake.clear()
                if self._stop.is_set():
                    return
                newer = self._take()
                if newer is not None:  # a newer checkpoint supersedes one still being tried
                    if current is not None:
                        current.file.close()
                    current = self._open(*newer)
                if current is None:
                    continue
                if self._upload(current):
                    current.file.close()
                    current, retry_wait = None, 0.0
                    continue
                retry_wait = min(_MAX_RETRY_S, 2 * retry_wait if retry_wait else _FIRST_RETRY_S)
        finally:
            if current is not None:
                current.file.close()

    def _open(self, path: Path, epoch: int) -> _Upload | None:
        try:
            # checkpoints are replaced by rename: this handle keeps the file it opened, even once deleted
            f = open(path, "rb")
        except OSError as e:
            self.emit(ev.CheckpointUploaded(stage=self.access().stage, epoch=epoch, ok=False, detail=f"{path}: {e.strerror or e}"))
            return None
        return _Upload(path, epoch, f, os.fstat(f.fileno()).st_size)

    def _upload(self, upload: _Upload) -> bool:
        """True when done with this checkpoint (stored, or refused for good); False to try it again."""
        access = self.access()
        stage, epoch = access.stage, upload.epoch
        try:
            held = self.client.upload_status(stage, upload.upload_id, access_token=access.access_token)
            offset = held.received if held.total == upload.size else 0
            upload.file.seek(offset)
            answer = self.client.upload_checkpoint_part(
                stage, self._chunks(upload.file, stage, epoch, upload.size, offset), upload_id=upload.upload_id, offset=offset,
                total=upload.size, epoch=epoch, access_token=access.access_token)
        except (CoordinatorUnavailable, UploadOutOfStep) as e:  # the next try continues from what arrived
            self.emit(ev.CheckpointUploaded(stage=stage, epoch=epoch, ok=False, detail=str(e)))
            return False
        except AdmissionError as e:
            self.emit(ev.CheckpointUploaded(stage=stage, epoch=epoch, ok=False, detail=str(e)))
            return True
        except _Abandoned:
            return True
        except OSError as e:
            self.emit(ev.CheckpointUploaded(stage=stage, epoch=epoch, ok=False, detail=f"{upload.path}: {e.strerror or e}"))
            return False
        if isinstance(answer, UploadStatus):  # the request ended before the file did: the next try sends the rest
            return False
        self.uploads += 1
        self.emit(ev.CheckpointUploaded(stage=stage, epoch=epoch, ok=True, detail=""))
        return True

    def _chunks(self, f, stage: str, epoch: int, size: int, offset: int) -> Iterator[bytes]:
        started = last_said = self.clock()
        sent = offset
        while chunk := f.read(self.chunk_bytes):
            if self._stop.is_set():
                raise _Abandoned()
            yield chunk
            sent += len(chunk)
            now = self.clock()
            if now - last_said >= self.progress_every and sent < size:
                last_said = now
                self.emit(ev.CheckpointUploadProgress(stage=stage, epoch=epoch, sent_bytes=sent, total_bytes=size,
                                                      seconds=now - started, resumed_at=offset))


class _Abandoned(Exception):
    """The uploader was stopped in the middle of an upload."""
