"""A newcomer's download of its stage's weights from a peer of the stage, sized by bytes and resumable.

Both sides of the ``rpc_download_state_from`` stream live here. The newcomer asks with a ``ResumePoint``
(the state it had begun to receive and how far it got); the peer answers with a ``StreamStart`` in its
first message (its state's metadata and where it begins), then the parts of its tensors, a part that
names a dtype starting the next tensor. A peer still holding the same state (same metadata: same
epoch) begins at the resume point, so a dropped connection costs only the part in flight, whether the
same peer comes back or another one serves that epoch's state; a peer that moved on begins at the start.

The newcomer holds each part to a deadline of its own (``sender_timeout``), the whole download to a
deadline from its size (``download_deadline``), reports progress as bytes arrive, and checks what
arrived against the stage's shapes and against the digest of the whole state (``state_digest``) that
the peer computed from its snapshot and put in the metadata. Two workers of a stage at the same epoch
hold different weights (SPARTA averages a slice at a time), and one worker's snapshot changes when a
round lands between two streams: the digest is what tells a newcomer that the parts it continued from
are not of the state it finished with, so it starts again instead of training on a mix.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence

import torch
from hivemind.compression import CompressionBase, CompressionInfo, deserialize_torch_tensor
from hivemind.p2p import P2P, PeerID
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils import MSGPackSerializer
from hivemind.utils.streaming import combine_from_streaming, split_for_streaming

from agora_server.tensor_stream import CHUNK_BYTES

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DownloadProgress:
    bytes_done: int
    bytes_total: int
    seconds: float
    """Since this peer's stream began."""
    peer_id: str
    resumed_at: int = 0
    """Bytes this stream did not send again because an earlier one had delivered them (0: from the start)."""


DIGEST_KEY = "digest"
"""Where a served state's metadata carries ``state_digest`` of its tensors."""


def state_digest(tensors: Sequence[torch.Tensor]) -> str:
    """SHA-256 over each tensor's dtype, shape and bytes, as served (the receiver reads them back bit for
    bit: bfloat16 parts as bfloat16, float32 as float32). hashlib lets go of the GIL while it hashes, so
    computing it on a stage's worth of weights does not stall the threads beside it."""
    digest = hashlib.sha256()
    for tensor in tensors:
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{flat.dtype}{tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


class StateDownloadTooSlow(RuntimeError):
    """No peer delivered the stage's weights within the download deadline."""


class _PeerStalled(Exception):
    """A peer sent nothing for a chunk's deadline: the download moves on to another peer."""


@dataclasses.dataclass(frozen=True)
class ResumePoint:
    """The newcomer's request: continue the state whose serialized metadata is ``metadata`` at part
    ``part`` of tensor ``tensor``. Empty metadata asks for a state from its start."""

    metadata: bytes = b""
    tensor: int = 0
    part: int = 0

    def to_message(self) -> averaging_pb2.DownloadData:
        return averaging_pb2.DownloadData(metadata=MSGPackSerializer.dumps([self.metadata, self.tensor, self.part]))

    @classmethod
    def from_message(cls, message: averaging_pb2.DownloadData) -> ResumePoint:
        """What a peer asked for; anything unreadable asks for the start."""
        try:
            metadata, tensor, part = MSGPackSerializer.loads(message.metadata)
            if isinstance(metadata, bytes) and isinstance(tensor, int) and isinstance(part, int) and tensor >= 0 and part >= 0:
                return cls(metadata, tensor, part)
        except Exception:
            pass
        return cls()


@dataclasses.dataclass(frozen=True)
class StreamStart:
    """The serving peer's first word: the metadata of the state it sends and the part it begins at."""

    metadata: bytes
    tensor: int
    part: int

    def to_bytes(self) -> bytes:
        return MSGPackSerializer.dumps([self.metadata, self.tensor, self.part])

    @classmethod
    def from_bytes(cls, data: bytes) -> StreamStart:
        metadata, tensor, part = MSGPackSerializer.loads(data)
        return cls(bytes(metadata), int(tensor), int(part))


def stream_state(metadata: bytes, tensors: Sequence[torch.Tensor], infos: Sequence[CompressionInfo],
                 compression: CompressionBase, asked: ResumePoint) -> Iterator[averaging_pb2.DownloadData]:
    """The serving side: the messages of a state, from ``asked`` when it names this very state and a part
    that exists, else from the start. Tensors before the resume point are not even compressed."""
    start = (asked.tensor, asked.part) if asked.metadata == metadata and asked.tensor < len(tensors) else (0, 0)
    first = True
    for index in range(start[0], len(tensors)):
        parts = split_for_streaming(compression.compress(tensors[index], infos[index], allow_inplace=False), CHUNK_BYTES)
        for number, part in enumerate(parts):
            if index == start[0] and number < start[1]:
                continue
            if first:
                yield averaging_pb2.DownloadData(tensor_part=part, metadata=StreamStart(metadata, index, number).to_bytes())
                first = False
            else:
                yield averaging_pb2.DownloadData(tensor_part=part)
    if first and start != (0, 0):  # the resume point lay past the last part: begin again rather than send nothing
        yield from stream_state(metadata, tensors, infos, compression, ResumePoint())


@dataclasses.dataclass
class PartialState:
    """What has arrived of a download so far, kept across streams and peers so that a new stream
    continues where a dropped one stopped."""

    metadata: bytes = b""
    tensors: list[torch.Tensor] = dataclasses.field(default_factory=list)
    parts: list[runtime_pb2.Tensor] = dataclasses.field(default_factory=list)
    """The parts of the tensor being received."""
    received: int = 0
    """Bytes of tensor parts kept (those of the whole tensors and of ``parts``)."""
    resumes: int = 0
    """Streams that continued from bytes an earlier one had delivered."""

    def resume_point(self) -> ResumePoint:
        return ResumePoint(self.metadata, len(self.tensors), len(self.parts))

    def begin(self, start: StreamStart) -> bool:
        """Accept a stream that begins at ``start``: continue when it is where this download stopped,
        start over when it is a state's beginning; False for anything else (the peer is not followed)."""
        if self.metadata and (start.metadata, start.tensor, start.part) == (self.metadata, len(self.tensors), len(self.parts)):
            if self.received:
                self.resumes += 1
            return True
        if (start.tensor, start.part) == (0, 0):
            self.restart()
            self.metadata = start.metadata
            return True
        return False

    def restart(self) -> None:
        """Forget everything received: the next stream begins at a state's start."""
        self.metadata, self.tensors, self.parts, self.received = b"", [], [], 0

    def add(self, part: runtime_pb2.Tensor) -> None:
        if part.dtype and self.parts:  # a new tensor begins: the previous one is whole
            self.finish_tensor()
        self.parts.append(part)
        self.received += len(part.buffer)

    def finish_tensor(self) -> None:
        if self.parts:
            self.tensors.append(deserialize_torch_tensor(combine_from_streaming(self.parts)))
            self.parts = []


def download_deadline(state_bytes: int, min_mbit: float, floor: float) -> float:
    """Seconds a download of ``state_bytes`` may take in all: its size at ``min_mbit``, at least ``floor``."""
    return max(floor, state_bytes * 8 / (min_mbit * 1e6))


async def fetch_state(
    p2p: P2P,
    stub_of: Callable[[P2P, PeerID], object],
    peers: Sequence[PeerID],
    shapes: Sequence[torch.Size],
    state_bytes: int,
    *,
    deadline: float,
    chunk_timeout: float,
    on_progress: Callable[[DownloadProgress], None],
    progress_every: float = 10.0,
    partial: PartialState | None = None,
) -> tuple[dict, list[torch.Tensor]] | None:
    """(metadata, tensors) from the first of ``peers`` that sends a complete state of ``shapes``; None
    when every peer refused or failed. StateDownloadTooSlow when ``deadline`` seconds pass first.
    ``partial``: what earlier tries received (updated in place), so that another try continues it."""
    partial = partial if partial is not None else PartialState()
    started = time.monotonic()
    for peer in peers:
        left = deadline - (time.monotonic() - started)
        if left <= 0:
            break
        try:
            complete = await asyncio.wait_for(
                _from_peer(p2p, stub_of, peer, partial, state_bytes, chunk_timeout, on_progress, progress_every), left)
        except asyncio.TimeoutError:
            break
        except Exception as e:  # this peer dropped out or sent something else: the next one may do
            logger.info("state download from %s stopped at %d bytes: %s", peer, partial.received, repr(e))
            continue
        if not complete:
            continue
        if not _matches(partial.tensors, shapes):  # whole but not this stage's weights: nothing of it is worth continuing
            partial.restart()
        elif (metadata := _verified_metadata(partial)) is None:
            logger.warning("the stage weights downloaded (last from %s, %d resumed stream(s)) do not match the checksum of the "
                           "state served: parts of different states, or a peer sent other weights than it announced; "
                           "downloading them again from the start", peer, partial.resumes)
            partial.restart()
        else:
            return metadata, partial.tensors
    if time.monotonic() - started >= deadline:
        raise StateDownloadTooSlow(f"the stage's weights ({state_bytes / 1e9:.2f} GB) did not arrive within {deadline:.0f}s")
    return None


async def _from_peer(p2p, stub_of, peer: PeerID, partial: PartialState, state_bytes: int, chunk_timeout: float,
                     on_progress: Callable[[DownloadProgress], None], progress_every: float) -> bool:
    """Receive ``peer``'s stream into ``partial``; True when it ended with the state whole."""
    stream: AsyncIterator[averaging_pb2.DownloadData] = await stub_of(p2p, peer).rpc_download_state_from(partial.resume_point().to_message())
    messages = stream.__aiter__()
    started = said = time.monotonic()
    began = False
    while True:
        try:
            message = await asyncio.wait_for(messages.__anext__(), chunk_timeout)
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            raise _PeerStalled(str(peer)) from None
        if not began:
            if not partial.begin(StreamStart.from_bytes(message.metadata)):
                raise ValueError(f"{peer} began its state where this download did not stop")
            began, resumed_at = True, partial.received
            if resumed_at:
                on_progress(DownloadProgress(min(resumed_at, state_bytes), state_bytes, 0.0, str(peer), resumed_at))
        partial.add(message.tensor_part)
        now = time.monotonic()
        if now - said >= progress_every:
            said = now
            on_progress(DownloadProgress(min(partial.received, state_bytes), state_bytes, now - started, str(peer), resumed_at))
    if not began:
        return False  # a peer that does not share sends nothing
    partial.finish_tensor()
    return True


def _verified_metadata(partial: PartialState) -> dict | None:
    """The state's metadata if the tensors assembled are the state it describes (its digest), else None."""
    try:
        metadata = MSGPackSerializer.loads(partial.metadata)
    except Exception:  # whatever a peer sent as metadata, the answer is "not verified"
        return None
    expected = metadata.get(DIGEST_KEY) if isinstance(metadata, dict) else None
    return metadata if isinstance(expected, str) and expected == state_digest(partial.tensors) else None


def _matches(tensors: Sequence[torch.Tensor], shapes: Sequence[torch.Size]) -> bool:
    return len(tensors) == len(shapes) and all(t.shape == s and t.is_floating_point() and bool(torch.isfinite(t).all())
                                                for t, s in zip(tensors, shapes))
