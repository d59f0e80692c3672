"""Tensor (de)serialisation for stage RPCs, on top of hivemind's protobuf tensors.

Shared by the stage server and the pipeline client. Parts arrive as a stream; the receiver counts
bytes as they come and gives up before decoding anything over its limit.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence

import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2
from hivemind.utils.streaming import combine_from_streaming, split_for_streaming

CHUNK_BYTES = 2**20  # under p2pd's 4 MiB message cap, large enough to keep per-message overhead small
ALLOWED_DTYPES = frozenset({"float32", "bfloat16", "float16", "int64"})


class PayloadError(ValueError):
    """A payload that cannot be decoded: truncated, oversized, or of an unsupported dtype."""


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


async def collect(messages: AsyncIterator, max_bytes: int) -> tuple[bytes, list[runtime_pb2.Tensor], int]:
    """Read a request/response stream: (metadata of the first message, tensor parts, payload bytes)."""
    metadata, parts, received = b"", [], 0
    async for message in messages:
        if not metadata and message.metadata:
            metadata = message.metadata
        for part in message.tensors:
            received += len(part.buffer)
            if received > max_bytes:
                raise PayloadError(f"payload exceeds the limit of {max_bytes} bytes")
            parts.append(part)
    return metadata, parts, received
