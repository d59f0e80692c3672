"""Checkpoint uploads that outlive a dropped connection: what has arrived of each, on disk and hashed.

A resumable upload is a file the node sends in one or more requests, each beginning where the
coordinator's part of it ends (``UploadStatus.received``). What a request delivered before its
connection dropped is kept, so the next request sends only the rest; the whole file is checked once,
when its last byte has arrived (``CheckpointStore``).

Bounded: one partial upload per node (a node beginning another drops its previous one), each no
larger than the upload limit, each dropped after ``expiry_s`` without a byte. The sha256 of what
arrived is kept as its running state beside the file, so completing an upload does not read the file
again; a coordinator restart therefore drops partial uploads (``CheckpointStore`` removes their files)
and the nodes begin again.

A request that takes over an upload (the node's connection dropped and it reconnected, while this
side may not have noticed the old request's end yet) makes the older request its ``owner`` no more:
appends happen under the upload's lock and only for its current owner, so the file, its hash and
``received`` always agree, whichever request's bytes came last.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO


@dataclasses.dataclass(eq=False)
class PartialUpload:
    node: str
    """The uploading node's peer id."""
    stage: str
    upload_id: str
    total: int
    path: Path
    file: BinaryIO
    touched: float
    received: int = 0
    owner: int = 0
    """Which request may append: each request that continues the upload takes the next number."""
    sha256: Any = dataclasses.field(default_factory=hashlib.sha256)
    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)

    def append(self, data: bytes) -> None:
        """Write and hash ``data`` (in a worker thread: hashlib and the write let go of the GIL)."""
        self.file.write(data)
        self.sha256.update(data)
        self.received += len(data)

    def close(self) -> None:
        self.file.close()
        self.path.unlink(missing_ok=True)


class PartialUploads:
    def __init__(self, clock: Callable[[], float], expiry_s: float):
        self._clock, self._expiry_s = clock, expiry_s
        self._by_node: dict[str, PartialUpload] = {}

    def find(self, node: str, stage: str, upload_id: str, total: int | None = None) -> PartialUpload | None:
        upload = self._by_node.get(node)
        if upload is None or (upload.stage, upload.upload_id) != (stage, upload_id) or total not in (None, upload.total):
            return None
        return upload

    def begin(self, node: str, stage: str, upload_id: str, total: int, path: Path) -> PartialUpload:
        """A new upload of ``node``, its part kept at ``path``; the node's previous one is dropped."""
        self.drop(self._by_node.get(node))
        upload = PartialUpload(node, stage, upload_id, total, path, open(path, "xb"), self._clock())
        self._by_node[node] = upload
        return upload

    def touch(self, upload: PartialUpload) -> None:
        upload.touched = self._clock()

    def take(self, upload: PartialUpload) -> None:
        """Complete or refused: no longer continued (the caller then owns its file)."""
        upload.owner += 1  # a request still appending to it stops
        if self._by_node.get(upload.node) is upload:
            del self._by_node[upload.node]

    def drop(self, upload: PartialUpload | None) -> None:
        if upload is not None:
            self.take(upload)
            upload.close()

    def expire(self) -> None:
        now = self._clock()
        for upload in [u for u in self._by_node.values() if now - u.touched > self._expiry_s and not u.lock.locked()]:
            self.drop(upload)


def fsync_file(file: BinaryIO) -> None:
    file.flush()
    os.fsync(file.fileno())
