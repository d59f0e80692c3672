"""Each stage's latest checkpoint on disk, as newcomers download it.

An upload streams into a hidden temporary file in the stage's folder while it is hashed and
counted; only a complete upload is fsynced, checked (``check_stage_state``), renamed to
``<stage>/<sha256>`` and recorded in the database. The stage's previous file stays until the next
upload replaces it, so a download that looked the checkpoint up just before a replacement still
finds its file. A resumable upload (``receive_part``) arrives in one or more requests and keeps what
each delivered (``partial_uploads``); it is checked the same way once its last byte is in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import secrets
import threading
from pathlib import Path
from typing import AsyncIterator, Callable

from fastapi.concurrency import run_in_threadpool

from agora.coordinator.checkpoint_check import InvalidCheckpoint, StageLayout, check_stage_state
from agora.coordinator.db import Database, StageCheckpoint
from agora.coordinator.errors import CoordinatorRefusal, Refusal
from agora.coordinator.partial_uploads import PartialUpload, PartialUploads, fsync_file

_PARTIAL_PREFIX = ".upload-"
# hand the disk writes to a thread in pieces this big: the event loop keeps serving meanwhile
_WRITE_BATCH = 4 * 2**20


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    stage: str
    sha256: str
    size: int
    path: Path
    uploader_username: str
    uploader_peer_id: str
    epoch: int | None
    uploaded_at: float


@dataclasses.dataclass(frozen=True)
class Uploader:
    username: str
    peer_id: str


@dataclasses.dataclass(frozen=True)
class UploadPart:
    """What a request of a resumable upload says of its body (the X-Upload-* headers)."""

    upload_id: str
    offset: int
    total: int


class CheckpointStore:
    def __init__(self, directory: Path, db: Database, max_upload_bytes: int, clock: Callable[[], float],
                 layouts: dict[str, StageLayout], partial_expiry_s: float = 3600.0):
        """``layouts``: each stage's weights as its model has them; an upload for a stage must match them.
        ``partial_expiry_s``: how long a resumable upload that receives nothing is kept."""
        self.directory, self.db, self.max_upload_bytes, self._clock = Path(directory), db, max_upload_bytes, clock
        self.layouts = layouts
        self._partials = PartialUploads(clock, partial_expiry_s)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._commit_lock = threading.Lock()
        self._remove_abandoned_uploads()

    def _remove_abandoned_uploads(self) -> None:
        # nothing uploads before the store exists: any partial file is left from a crash
        for partial in self.directory.glob(f"*/{_PARTIAL_PREFIX}*"):
            partial.unlink(missing_ok=True)

    def current(self, stage: str) -> CheckpointInfo | None:
        with self.db.session() as s:
            row = s.get(StageCheckpoint, stage)
            return None if row is None else self._info(row)

    def _info(self, row: StageCheckpoint) -> CheckpointInfo:
        return CheckpointInfo(stage=row.stage, sha256=row.sha256, size=row.size, path=self.directory / row.stage / row.sha256,
                              uploader_username=row.uploader_username, uploader_peer_id=row.uploader_peer_id,
                              epoch=row.epoch, uploaded_at=row.uploaded_at)

    async def receive(self, stage: str, chunks: AsyncIterator[bytes], uploader: Uploader, *, epoch: int | None = None,
                      expected_size: int | None = None, expected_sha256: str | None = None) -> CheckpointInfo:
        """Store the streamed bytes as ``stage``'s checkpoint, or refuse and leave the current one in place."""
        if expected_size is not None and expected_size > self.max_upload_bytes:
            raise CoordinatorRefusal(Refusal.CHECKPOINT_TOO_LARGE, limit=self.max_upload_bytes)
        stage_dir = self.directory / stage
        stage_dir.mkdir(exist_ok=True)
        partial = stage_dir / f"{_PARTIAL_PREFIX}{secrets.token_hex(8)}"
        digest, size = hashlib.sha256(), 0
        file = await run_in_threadpool(open, partial, "xb")
        try:
            batch = bytearray()
            async for chunk in chunks:
                size += len(chunk)
                if size > self.max_upload_bytes:
                    raise CoordinatorRefusal(Refusal.CHECKPOINT_TOO_LARGE, limit=self.max_upload_bytes)
                digest.update(chunk)
                batch += chunk
                if len(batch) >= _WRITE_BATCH:
                    await run_in_threadpool(file.write, bytes(batch))
                    batch.clear()
            await run_in_threadpool(_finish, file, bytes(batch))
            return await self._store(stage, partial, digest.hexdigest(), size, uploader, epoch, expected_size, expected_sha256)
        finally:
            file.close()
            partial.unlink(missing_ok=True)  # after a commit it has already been renamed away

    async def _store(self, stage: str, partial: Path, sha256: str, size: int, uploader: Uploader, epoch: int | None,
                     expected_size: int | None, expected_sha256: str | None) -> CheckpointInfo:
        """The complete upload at ``partial`` (on disk, synced) as the stage's checkpoint, once it passes every check."""
        self._check_complete(size, sha256, expected_size, expected_sha256)
        # checked whole before it can replace anything: a junk upload leaves the current one served
        epoch = await run_in_threadpool(self._check_state, stage, partial, epoch)
        return await run_in_threadpool(self._commit, stage, partial, sha256, size, uploader, epoch)

    def upload_status(self, stage: str, uploader: Uploader, upload_id: str) -> tuple[int, int]:
        """(bytes held, total) of the node's resumable upload ``upload_id``; (0, 0) when none is held."""
        self._partials.expire()
        upload = self._partials.find(uploader.peer_id, stage, upload_id)
        return (upload.received, upload.total) if upload else (0, 0)

    async def receive_part(self, stage: str, chunks: AsyncIterator[bytes], uploader: Uploader, part: UploadPart, *,
                           epoch: int | None = None, expected_sha256: str | None = None) -> CheckpointInfo | None:
        """Append a request's body to a resumable upload; the stored checkpoint once the upload is complete,
        None while bytes are still to come. What arrived before a dropped connection is kept."""
        if part.total > self.max_upload_bytes:
            raise CoordinatorRefusal(Refusal.CHECKPOINT_TOO_LARGE, limit=self.max_upload_bytes)
        self._partials.expire()
        upload = self._partials.find(uploader.peer_id, stage, part.upload_id, part.total)
        if upload is None:
            if part.offset != 0:
                raise CoordinatorRefusal(Refusal.UPLOAD_OFFSET_MISMATCH, received=0, offset=part.offset)
            (self.directory / stage).mkdir(exist_ok=True)
            upload = self._partials.begin(uploader.peer_id, stage, part.upload_id, part.total,
                                          self.directory / stage / f"{_PARTIAL_PREFIX}{secrets.token_hex(8)}")
        async with upload.lock:
            if part.offset != upload.received:
                raise CoordinatorRefusal(Refusal.UPLOAD_OFFSET_MISMATCH, received=upload.received, offset=part.offset)
            upload.owner += 1
            owner = upload.owner
        arrived, batch = part.offset, bytearray()
        try:
            async for chunk in chunks:
                arrived += len(chunk)
                if arrived > part.total:
                    self._partials.drop(upload)
                    raise CoordinatorRefusal(Refusal.UPLOAD_PAST_END, total=part.total)
                batch += chunk
                if len(batch) >= _WRITE_BATCH:
                    await self._append(upload, owner, bytes(batch))
                    batch.clear()
        except CoordinatorRefusal:
            raise
        except Exception:
            await self._append(upload, owner, bytes(batch))  # kept: the next request need not send it again
            raise
        await self._append(upload, owner, bytes(batch))
        if upload.received < upload.total:
            return None
        self._partials.take(upload)
        try:
            await run_in_threadpool(fsync_file, upload.file)
            return await self._store(stage, upload.path, upload.sha256.hexdigest(), upload.received, uploader, epoch,
                                     upload.total, expected_sha256)
        finally:
            upload.close()  # after a commit its file has already been renamed away

    async def _append(self, upload: PartialUpload, owner: int, data: bytes) -> None:
        async with upload.lock:
            if upload.owner != owner:
                raise CoordinatorRefusal(Refusal.UPLOAD_TAKEN_OVER)
            if data:
                try:
                    await run_in_threadpool(upload.append, data)
                except OSError:
                    self._partials.drop(upload)  # a part whose write failed no longer matches its hash
                    raise
            self._partials.touch(upload)

    def _check_state(self, stage: str, partial: Path, epoch: int | None) -> int:
        try:
            return check_stage_state(partial, self.layouts[stage], epoch)
        except InvalidCheckpoint as e:
            raise CoordinatorRefusal(Refusal.INVALID_CHECKPOINT, stage=stage, reason=str(e)) from None

    @staticmethod
    def _check_complete(size: int, sha256: str, expected_size: int | None, expected_sha256: str | None) -> None:
        if size == 0:
            raise CoordinatorRefusal(Refusal.EMPTY_CHECKPOINT)
        if expected_size is not None and size != expected_size:
            raise CoordinatorRefusal(Refusal.CHECKPOINT_INCOMPLETE, received=size, expected=expected_size)
        if expected_sha256 is not None and expected_sha256.lower() != sha256:
            raise CoordinatorRefusal(Refusal.CHECKPOINT_MISMATCH, actual=sha256, expected=expected_sha256)

    def _commit(self, stage: str, partial: Path, sha256: str, size: int, uploader: Uploader, epoch: int | None) -> CheckpointInfo:
        with self._commit_lock:
            os.replace(partial, self.directory / stage / sha256)
            _fsync_dir(self.directory / stage)  # the rename itself must survive a crash before the row says so
            with self.db.session() as s:
                row = s.get(StageCheckpoint, stage)
                if row is None:
                    row = StageCheckpoint(stage=stage)
                    s.add(row)
                elif row.sha256 != sha256:
                    row.previous_sha256 = row.sha256
                row.sha256, row.size, row.epoch, row.uploaded_at = sha256, size, epoch, self._clock()
                row.uploader_username, row.uploader_peer_id = uploader.username, uploader.peer_id
                info = self._info(row)
                keep = {row.sha256, row.previous_sha256}
            for old in (self.directory / stage).iterdir():
                if old.name not in keep and not old.name.startswith(_PARTIAL_PREFIX):
                    old.unlink(missing_ok=True)
            return info


def _finish(file, tail: bytes) -> None:
    file.write(tail)
    file.flush()
    os.fsync(file.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
