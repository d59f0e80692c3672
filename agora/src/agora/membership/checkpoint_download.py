"""Download a stage checkpoint over HTTP: resumable, checked against its sha256, moved into place whole.

Bytes arrive in ``<dest>.part``; the server's ETag for them is kept in ``<dest>.part.etag``. An
interrupted download resumes with a Range request carrying that ETag in If-Range, so a file that
changed on the server meanwhile comes whole again instead of being spliced onto old bytes. The
finished file must match the sha256 the server names (X-Checkpoint-SHA256) before it replaces
``dest``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Callable

import httpx

from agora.protocol import CHECKPOINT_SHA256_HEADER

ProgressCallback = Callable[[int, int | None], None]
"""Called with (bytes on disk, total bytes or None if the server did not say)."""

_HASH_BLOCK = 4 * 2**20


class CheckpointDownloadError(RuntimeError):
    """The checkpoint could not be downloaded; the message says what to do."""


class ChecksumMismatch(CheckpointDownloadError):
    """The assembled file does not hash to the expected sha256; the partial file has been deleted."""


@dataclasses.dataclass(frozen=True)
class DownloadResult:
    path: Path
    sha256: str
    size: int
    resumed_from: int
    """Bytes reused from an earlier partial download (0: downloaded from the start)."""


def download_checkpoint(url: str, dest: str | os.PathLike, *, on_progress: ProgressCallback | None = None,
                        timeout: float = 60.0, expected_sha256: str | None = None, headers: dict[str, str] | None = None,
                        chunk_size: int = 2**20, client: httpx.Client | None = None) -> DownloadResult:
    """Fetch ``url`` into ``dest``, resuming ``dest.part`` if an earlier attempt left one.

    ``timeout`` bounds connecting and each read, not the whole transfer. ``expected_sha256``, when
    given, must match the server's too. Network failures leave the partial file for the next call;
    a checksum mismatch deletes it and raises ChecksumMismatch.
    """
    dest = Path(dest)
    part, etag_file = dest.with_name(dest.name + ".part"), dest.with_name(dest.name + ".part.etag")
    owns_client = client is None
    client = client or httpx.Client(timeout=timeout, follow_redirects=True)
    try:
        for _attempt in range(2):  # the second only after the server refused our range (416)
            offset = part.stat().st_size if part.exists() else 0
            request_headers = dict(headers or {})
            if offset:
                request_headers["Range"] = f"bytes={offset}-"
                if etag_file.exists():
                    request_headers["If-Range"] = etag_file.read_text(encoding="ascii").strip()
            with client.stream("GET", url, headers=request_headers) as response:
                if response.status_code == 416:
                    # the partial file is as long as the server's file or longer: it cannot be continued
                    _discard(part, etag_file)
                    continue
                _raise_for_status(response, url)
                server_sha = response.headers.get(CHECKPOINT_SHA256_HEADER)
                if response.status_code == 200 or not offset:
                    offset = 0  # a whole answer: the server ignored our range or the file changed
                _save_etag(etag_file, response.headers.get("etag"))
                total = _total_size(response, offset)
                _receive(response, part, offset, total, chunk_size, on_progress)
            return _finish(part, etag_file, dest, expected_sha256, server_sha, offset)
        raise CheckpointDownloadError(f"{url} refused the range of the partial file twice; delete {part} and retry.")
    except httpx.HTTPError as e:
        raise CheckpointDownloadError(f"Downloading {url} failed ({type(e).__name__}: {e}); "
                                      f"the {part.name} file is kept, so the next try resumes.") from e
    finally:
        if owns_client:
            client.close()


def _raise_for_status(response: httpx.Response, url: str) -> None:
    if response.status_code in (200, 206):
        return
    response.read()
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        detail = response.text
    raise CheckpointDownloadError(f"{url} answered {response.status_code}: {detail[:300]}")


def _save_etag(etag_file: Path, etag: str | None) -> None:
    # weak ETags cannot be used with If-Range, so they are not worth keeping
    if etag and not etag.startswith("W/"):
        etag_file.write_text(etag, encoding="ascii")
    else:
        etag_file.unlink(missing_ok=True)


def _total_size(response: httpx.Response, offset: int) -> int | None:
    content_range = response.headers.get("content-range", "")
    if response.status_code == 206 and "/" in content_range:
        total = content_range.rsplit("/", 1)[1]
        return int(total) if total.isdigit() else None
    length = response.headers.get("content-length", "")
    return offset + int(length) if length.isdigit() else None


def _receive(response: httpx.Response, part: Path, offset: int, total: int | None, chunk_size: int,
             on_progress: ProgressCallback | None) -> None:
    with open(part, "r+b" if offset else "wb") as f:
        f.seek(offset)
        f.truncate()
        done = offset
        if on_progress:
            on_progress(done, total)
        for chunk in response.iter_bytes(chunk_size):
            f.write(chunk)
            done += len(chunk)
            if on_progress:
                on_progress(done, total)
        f.flush()
        os.fsync(f.fileno())
    if total is not None and done != total:
        raise CheckpointDownloadError(f"the server sent {done} of {total} bytes; try again to resume.")


def _finish(part: Path, etag_file: Path, dest: Path, expected: str | None, server_sha: str | None,
            resumed_from: int) -> DownloadResult:
    if expected and server_sha and expected.lower() != server_sha.lower():
        raise CheckpointDownloadError(f"the server serves a checkpoint with sha256 {server_sha}, not the expected {expected}.")
    want = (expected or server_sha or "").lower()
    actual, size = _sha256_of(part), part.stat().st_size
    if want and actual != want:
        _discard(part, etag_file)
        raise ChecksumMismatch(f"the downloaded checkpoint has sha256 {actual}, expected {want}; the partial file "
                               f"was deleted, so the next try downloads from the start.")
    os.replace(part, dest)
    etag_file.unlink(missing_ok=True)
    return DownloadResult(path=dest, sha256=actual, size=size, resumed_from=resumed_from)


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _discard(part: Path, etag_file: Path) -> None:
    part.unlink(missing_ok=True)
    etag_file.unlink(missing_ok=True)
