"""A stated maximum for one frame of a p2p stream, enforced before the frame's body is read.

hivemind frames every stream message as an 8-byte length and that many bytes, read at once: a peer
that declares 2 GiB and sends 300 MiB makes the reader hold 300 MiB, whoever it is. The largest frame
any Agora peer sends is a tensor chunk of a stage RPC (1 MiB) with its metadata; hivemind's own
(DHT, averaging, state download) are smaller still. A declared length over ``MAX_FRAME_BYTES`` is
treated as the stream breaking off: the reader gives up on it without reading the body.
"""

from __future__ import annotations

import asyncio

MAX_FRAME_BYTES = 8 * 2**20
"""Largest frame a peer may send: several times the largest one Agora's peers send."""


def install_frame_limit() -> None:
    """Make this process's hivemind p2p refuse frames over ``MAX_FRAME_BYTES``; call it before any DHT
    or P2P starts (their processes are forked from this one and keep the limit)."""
    from hivemind.p2p import P2P

    if getattr(P2P.receive_raw_data, "frame_limit", None) == MAX_FRAME_BYTES:
        return

    async def receive_raw_data(reader: asyncio.StreamReader) -> bytes:
        header = await reader.readexactly(P2P.HEADER_LEN)
        length = int.from_bytes(header, P2P.BYTEORDER)
        if length > MAX_FRAME_BYTES:
            # what hivemind's readers take for a closed stream: they stop reading it and let go of it
            raise asyncio.IncompleteReadError(partial=b"", expected=length)
        return await reader.readexactly(length)

    receive_raw_data.frame_limit = MAX_FRAME_BYTES
    P2P.receive_raw_data = staticmethod(receive_raw_data)
