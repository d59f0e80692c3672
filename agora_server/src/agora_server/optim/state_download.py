"""A newcomer's download of its stage's weights from a peer of the stage, sized by bytes.

The peers serve their state through hivemind's ``rpc_download_state`` stream (one message per part of
a tensor; a part that names a dtype starts the next tensor). This client reads it in the worker's own
process, so it can hold each chunk to a deadline of its own (``sender_timeout``), the whole download
to a deadline from its size (``download_deadline``), report progress as bytes arrive, check what
arrived against the stage's shapes, and go on to another peer when one drops out.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Sequence

import torch
from hivemind.compression import deserialize_torch_tensor
from hivemind.p2p import P2P, PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils import MSGPackSerializer
from hivemind.utils.streaming import combine_from_streaming


@dataclasses.dataclass(frozen=True)
class DownloadProgress:
    bytes_done: int
    bytes_total: int
    seconds: float
    """Since this peer's stream began."""
    peer_id: str


class StateDownloadTooSlow(RuntimeError):
    """No peer delivered the stage's weights within the download deadline."""


class _PeerStalled(Exception):
    """A peer sent nothing for a chunk's deadline: the download moves on to another peer."""


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
) -> tuple[dict, list[torch.Tensor]] | None:
    """(metadata, tensors) from the first of ``peers`` that sends a complete state of ``shapes``; None
    when every peer refused or failed. StateDownloadTooSlow when ``deadline`` seconds pass first."""
    started = time.monotonic()
    for peer in peers:
        left = deadline - (time.monotonic() - started)
        if left <= 0:
            break
        try:
            state = await asyncio.wait_for(
                _from_peer(p2p, stub_of, peer, state_bytes, chunk_timeout, on_progress, progress_every), left)
        except asyncio.TimeoutError:
            break
        except Exception:  # this peer dropped out or sent something else: the next one may do
            continue
        if state is not None and _matches(state[1], shapes):
            return state
    if time.monotonic() - started >= deadline:
        raise StateDownloadTooSlow(f"the stage's weights ({state_bytes / 1e9:.2f} GB) did not arrive within {deadline:.0f}s")
    return None


async def _from_peer(p2p, stub_of, peer: PeerID, state_bytes: int, chunk_timeout: float,
                     on_progress: Callable[[DownloadProgress], None], progress_every: float) -> tuple[dict, list[torch.Tensor]] | None:
    stream = await stub_of(p2p, peer).rpc_download_state(averaging_pb2.DownloadRequest())
    messages = stream.__aiter__()
    metadata, tensors, parts = None, [], []
    started = said = time.monotonic()
    received = 0
    while True:
        try:
            message = await asyncio.wait_for(messages.__anext__(), chunk_timeout)
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            raise _PeerStalled(str(peer)) from None
        if message.metadata:
            metadata = MSGPackSerializer.loads(message.metadata)
        if message.tensor_part.dtype and parts:  # a new tensor begins: the previous one is whole
            tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
            parts = []
        parts.append(message.tensor_part)
        received += len(message.tensor_part.buffer)
        now = time.monotonic()
        if now - said >= progress_every:
            said = now
            on_progress(DownloadProgress(min(received, state_bytes), state_bytes, now - started, str(peer)))
    if parts:
        tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
    return (metadata, tensors) if metadata is not None else None  # a peer that does not share sends nothing


def _matches(tensors: Sequence[torch.Tensor], shapes: Sequence[torch.Size]) -> bool:
    return len(tensors) == len(shapes) and all(t.shape == s and t.is_floating_point() and bool(torch.isfinite(t).all())
                                                for t, s in zip(tensors, shapes))
