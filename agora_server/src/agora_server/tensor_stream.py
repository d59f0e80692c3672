"""Tensor (de)serialisation for stage RPCs, on top of hivemind's protobuf tensors.

Shared by the stage server and the pipeline client. Parts arrive as a stream; the receiver counts
bytes as they come and gives up before decoding anything over its limit.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterable, Sequence

import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2
from hivemind.utils.streaming import combine_from_streaming, split_for_streaming

CHUNK_BYTES = 2**20  # under p2pd's 4 MiB message cap, large enough to keep per-message overhead small
ALLOWED_DTYPES = frozenset({"float32", "bfloat16", "float16", "int64"})


class PayloadError(ValueError):
    """A payload that cannot be decoded: truncated, oversized, or of an unsupported dtype."""


class FirstMessageLate(PayloadError):
    """A stream whose first message did not arrive in time: nothing more is read from it."""


def serialize(tensors: Sequence[torch.Tensor]) -> list[runtime_pb2.Tensor]:
    return [part for t in tensors for part in split_for_streaming(_serialize_one(t.detach().contiguous()), CHUNK_BYTES)]


def _serialize_one(tensor: torch.Tensor) -> runtime_pb2.Tensor:
    if tensor.dtype != torch.bfloat16:
        return serialize_torch_tensor(tensor)
    return bfloat16_message(tensor)


def bfloat16_message(tensor: torch.Tensor) -> runtime_pb2.Tensor:
    """A bfloat16 tensor as its raw 2-byte patterns. hivemind widens bfloat16 to float32 unless
    USE_LEGACY_BFLOAT16=0: twice the bytes, and it rewrites NaN bit patterns (token ids ride in them);
    hivemind's reader recognises 2 bytes per element and reinterprets them."""
    return runtime_pb2.Tensor(
        compression=runtime_pb2.CompressionType.NONE,
        buffer=tensor.contiguous().view(torch.int16).numpy().tobytes(),
        size=tensor.shape,
        dtype="bfloat16",
    )


def group_parts(parts: Iterable[runtime_pb2.Tensor]) -> list[list[runtime_pb2.Tensor]]:
    """A part with a dtype starts a new tensor; the ones after it continue its buffer."""
    groups: list[list[runtime_pb2.Tensor]] = []
    for part in parts:
        if part.dtype:
            groups.append([part])
        elif groups:
            groups[-1].append(part)
        else:
            raise PayloadError("payload starts with a continuation chunk")
    return groups


def payload_sizes(parts: Iterable[runtime_pb2.Tensor]) -> list[int]:
    """Bytes each tensor of a payload occupied on the wire."""
    return [sum(len(part.buffer) for part in group) for group in group_parts(parts)]


def deserialize(parts: Iterable[runtime_pb2.Tensor]) -> list[torch.Tensor]:
    tensors = []
    for index, group in enumerate(group_parts(parts)):
        head = group[0]
        if head.dtype not in ALLOWED_DTYPES:
            raise PayloadError(f"tensor {index} has unsupported dtype {head.dtype[:32]!r}")
        if head.chunks and len(group) < head.chunks:
            raise PayloadError(f"tensor {index} arrived in {len(group)} of {head.chunks} chunks (truncated)")
        if head.chunks and len(group) != head.chunks:  # more parts than declared, or a negative count
            raise PayloadError(f"tensor {index} arrived in {len(group)} chunks, its header declared {head.chunks}")
        try:
            tensor = deserialize_torch_tensor(combine_from_streaming(group))
        except Exception as e:
            raise PayloadError(f"tensor {index} could not be decoded: {type(e).__name__}") from None
        tensors.append(tensor.detach().requires_grad_(False))
    return tensors


async def discard(messages: AsyncIterator, max_bytes: int) -> None:
    """Read the rest of a refused stream without keeping it, up to what ``collect`` would have read."""
    received, count, most = 0, 0, part_limit(max_bytes)
    with contextlib.suppress(Exception):  # a caller that broke off has nothing more to send
        async for message in messages:
            received, count = received + message.ByteSize(), count + 1
            if received > max_bytes or count > most:
                return


MAX_METADATA_BYTES = 64 * 2**10
"""Largest request metadata (run, stage, rpc, access token): a few hundred bytes in practice."""
_SPARE_PARTS = 16  # parts beyond the full chunks of the byte limit: one short last chunk per tensor


def part_limit(max_bytes: int) -> int:
    """Most parts a payload of ``max_bytes`` needs: full chunks, plus a short one per tensor."""
    return max_bytes // CHUNK_BYTES + _SPARE_PARTS


async def collect(messages: AsyncIterator, max_bytes: int, check_metadata: Callable[[bytes], None] | None = None,
                  first_within: float | None = None) -> tuple[bytes, list[runtime_pb2.Tensor], int]:
    """Read a request/response stream: (metadata of the first message, tensor parts, bytes received).

    Every message counts with its whole encoded size (empty parts, headers and metadata included), and
    the parts with their number, so what a sender can make the reader hold is bounded by ``max_bytes``
    however it cuts its payload. With ``check_metadata`` the first message must carry the metadata,
    which is checked (the caller's access, say) before anything more is read. With ``first_within``
    the first message must arrive within that many seconds (``FirstMessageLate``), so that a caller
    who opens streams and sends nothing cannot hold the places of requests waiting to be checked."""
    metadata, parts, received = b"", [], 0
    most_parts = part_limit(max_bytes)
    stream = aiter(messages)
    first = True
    while True:
        try:
            message = await (asyncio.wait_for(anext(stream), first_within) if first and first_within is not None else anext(stream))
        except StopAsyncIteration:
            break
        except TimeoutError:
            raise FirstMessageLate(f"no first message within {first_within} s") from None
        received += message.ByteSize()
        if received > max_bytes:
            raise PayloadError(f"payload exceeds the limit of {max_bytes} bytes")
        if first and check_metadata is not None:  # metadata missing from it is checked (and refused) as empty
            if len(message.metadata) > MAX_METADATA_BYTES:
                raise PayloadError(f"metadata of {len(message.metadata)} bytes exceeds {MAX_METADATA_BYTES}")
            check_metadata(message.metadata)
        first = False
        if not metadata and message.metadata:
            metadata = message.metadata
        parts.extend(message.tensors)
        if len(parts) > most_parts:
            raise PayloadError(f"payload arrives in more than {most_parts} parts")
    if first and check_metadata is not None:  # no message at all: no metadata either
        check_metadata(b"")
    return metadata, parts, received
