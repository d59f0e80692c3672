"""Uploading a worker's checkpoint to the coordinator, on a thread and a connection of its own.

A head or tail checkpoint with its optimizer state is about 23 GB: 15 minutes at 200 Mbit/s, longer
than the renewal margin of an access token. Heartbeats and renewals therefore never wait for it: the
session hands the file over and goes on. Only the newest checkpoint waiting is kept (an older one
that has not started yet is never sent), a failed upload is tried again after a doubling wait unless
a newer checkpoint has arrived meanwhile, and progress (bytes, MB/s, ETA) is reported while it runs.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from agora.membership.client import AdmissionError, CoordinatorClient, CoordinatorUnavailable
from agora.protocol import AccessAnswer
from agora_server.telemetry import events as ev

CHUNK_BYTES = 4 * 2**20
"""Bytes read and sent at a time: the memory an upload holds, whatever the checkpoint's size."""
_FIRST_RETRY_S, _MAX_RETRY_S = 5.0, 300.0


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
        """Stop, abandoning an upload in progress (the coordinator discards a partial one)."""
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
        while not self._stop.is_set():
            self._wake.wait(retry_wait or None)
            self._wake.clear()
            if self._stop.is_set():
                return
            pending = self._take()
            if pending is None:
                continue
            if self._upload(*pending):
                retry_wait = 0.0
                continue
            with self._lock:  # a newer checkpoint supersedes the failed one
                if self._pending is None:
                    self._pending = pending
            retry_wait = min(_MAX_RETRY_S, 2 * retry_wait if retry_wait else _FIRST_RETRY_S)

    def _upload(self, path: Path, epoch: int) -> bool:
        """True when done with this checkpoint (stored, or refused for good); False to try it again."""
        access = self.access()
        stage = access.stage
        try:
            # checkpoints are replaced by rename: this handle keeps the file it opened, even once deleted
            f = open(path, "rb")
        except OSError as e:
            self.emit(ev.CheckpointUploaded(stage=stage, epoch=epoch, ok=False, detail=f"{path}: {e.strerror or e}"))
            return True
        with f:
            size = os.fstat(f.fileno()).st_size
            try:
                self.client.upload_checkpoint(stage, self._chunks(f, stage, epoch, size), size=size, epoch=epoch,
                                              access_token=access.access_token)
            except CoordinatorUnavailable as e:
                self.emit(ev.CheckpointUploaded(stage=stage, epoch=epoch, ok=False, detail=str(e)))
                return False
            except AdmissionError as e:
                self.emit(ev.CheckpointUploaded(stage=stage, epoch=epoch, ok=False, detail=str(e)))
                return True
            except _Abandoned:
                return True
            except OSError as e:
                self.emit(ev.CheckpointUploaded(stage=stage, epoch=epoch, ok=False, detail=f"{path}: {e.strerror or e}"))
                return False
        self.uploads += 1
        self.emit(ev.CheckpointUploaded(stage=stage, epoch=epoch, ok=True, detail=""))
        return True

    def _chunks(self, f, stage: str, epoch: int, size: int) -> Iterator[bytes]:
        started = last_said = self.clock()
        sent = 0
        while chunk := f.read(self.chunk_bytes):
            if self._stop.is_set():
                raise _Abandoned()
            yield chunk
            sent += len(chunk)
            now = self.clock()
            if now - last_said >= self.progress_every and sent < size:
                last_said = now
                self.emit(ev.CheckpointUploadProgress(stage=stage, epoch=epoch, sent_bytes=sent, total_bytes=size,
                                                      seconds=now - started))


class _Abandoned(Exception):
    """The uploader was stopped in the middle of an upload."""
