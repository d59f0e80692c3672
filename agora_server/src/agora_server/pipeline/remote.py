"""Calls to a stage worker over hivemind's p2p layer, with response checks.

Two kinds of failure are kept apart: ``StageRefused`` (the worker judged the request bad) and
``StageCallFailed`` (timeout, lost connection, worker error or an implausible answer). The trainer
bans the worker and retries elsewhere on both: only the reason it drops a micro-batch with differs,
since a worker that refuses what its stage's other workers serve is the one at fault. A third answer,
``StageGraphGone``, is no failure: a backward sent without its inputs found no kept graph, and the
trainer sends the inputs.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
from collections.abc import AsyncIterator, Sequence

import torch
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from agora_server.access import PeerAccess
from agora_server.models.config import StageKind
from agora_server.tensor_stream import PayloadError, collect, deserialize, payload_sizes, serialize
from agora_server.wire import (
    GRAPH_GONE,
    BackwardGraph,
    GraphUse,
    RequestMeta,
    Rpc,
    answer_parts,
    gradient_to_wire,
    handler_name,
    id_slots,
    response_fields,
    unpack_boundary,
    unpack_response,
)


async def read_answer(stream: AsyncIterator[runtime_pb2.ExpertResponse], max_bytes: int) -> tuple[bytes, list[runtime_pb2.Tensor], int]:
    """A worker's answer on ``stream``: (metadata, tensor parts, bytes received), read up to the last part it
    declares; then this side closes the stream, which the worker waits for (``wire.answer_parts``)."""

    async def through_last_part() -> AsyncIterator[runtime_pb2.ExpertResponse]:
        expected, received, first = None, 0, True
        async for message in stream:
            if first:  # the status travels with the first message
                expected, first = answer_parts(message.metadata), False
            received += len(message.tensors)
            yield message
            if expected is not None and received >= expected:
                return

    try:
        return await collect(through_last_part(), max_bytes)
    finally:
        await stream.aclose()


class StageRefused(Exception):
    """The worker refused the request as malformed."""


class StageCallFailed(Exception):
    """The call did not produce a usable answer."""


class StageGraphGone(Exception):
    """A backward sent without its inputs (``GraphUse.KEPT``) found no graph on the worker."""


@dataclasses.dataclass(frozen=True)
class StageAnswer:
    outputs: list[torch.Tensor]
    graph: BackwardGraph | None
    """How a head or body worker ran a backward (None for a forward or the tail's backward)."""
    kept: bool = False
    """The worker kept the graph of this training forward for its backward."""


class StageCaller:
    def __init__(
        self,
        p2p: P2P,
        run: str,
        wire_dtype: torch.dtype,
        boundary_width: int,
        max_response_bytes: int = 1 << 30,
        access: PeerAccess | None = None,
    ):
        """``access``: this trainer's access, whose current token goes with every request."""
        self.p2p, self.run, self.wire_dtype, self.max_response_bytes = p2p, run, wire_dtype, max_response_bytes
        self.access = access
        self.boundary_width = boundary_width
        self.bytes_sent: collections.Counter[str] = collections.Counter()
        """Payload bytes per RPC kind ("forward", "backward"), as serialised: the real traffic."""
        self.bytes_received: collections.Counter[str] = collections.Counter()
        self.boundary_bytes: collections.Counter[str] = collections.Counter()
        """Bytes of the tensors that would cross a stage boundary in a stage-to-stage deployment:
        "forward" for boundaries (activations + ids), "backward" for their gradients."""

    async def call(self, peer_id: str, stage: str, kind: StageKind, rpc: Rpc, tensors: Sequence[torch.Tensor], *,
                   timeout: float, microbatch: int = -1) -> list[torch.Tensor]:
        """The answer's tensors (see ``request``)."""
        answer = await self.request(peer_id, stage, kind, rpc, tensors, timeout=timeout, microbatch=microbatch)
        return answer.outputs

    async def request(
        self,
        peer_id: str,
        stage: str,
        kind: StageKind,
        rpc: Rpc,
        tensors: Sequence[torch.Tensor],
        *,
        timeout: float,
        microbatch: int = -1,
        graph: GraphUse = GraphUse.NONE,
        session: str = "",
        batch_shape: torch.Size | None = None,
    ) -> StageAnswer:
        """``batch_shape``: the micro-batch's [B, T] where ``tensors`` do not start with it (a backward
        that carries only the gradient still does)."""
        meta = RequestMeta(run=self.run, stage=stage, rpc=rpc, microbatch=microbatch, access=self.access.token if self.access else "",
                           graph=graph, session=session)
        wire = gradient_to_wire(tensors, self.wire_dtype)
        try:
            metadata, parts = await asyncio.wait_for(self._exchange(PeerID.from_base58(peer_id), rpc, meta, wire), timeout)
        except asyncio.TimeoutError:
            raise StageCallFailed(f"no answer within {timeout:.0f}s") from None
        except Exception as e:  # unreachable peer, broken stream, oversized answer: p2pd has its own error types
            raise StageCallFailed(f"{type(e).__name__}: {e}") from None

        status = unpack_response(metadata)
        if status.error is not None:
            if status.error.startswith(GRAPH_GONE):
                raise StageGraphGone(status.error)
            raise (StageRefused if status.error.startswith("refused") else StageCallFailed)(status.error)
        try:
            outputs = deserialize(parts)
        except PayloadError as e:
            raise StageCallFailed(f"undecodable answer: {e}") from None
        self._check_outputs(kind, rpc, batch_shape or tensors[0].shape, outputs)
        for name, size in zip(response_fields(kind, rpc), payload_sizes(parts)):
            if name in ("boundary", "grad_boundary"):
                self.boundary_bytes[rpc.value] += size
        return StageAnswer(outputs, status.graph, status.kept)

    async def _exchange(self, peer: PeerID, rpc: Rpc, meta: RequestMeta, tensors: Sequence[torch.Tensor]):
        parts = serialize(tensors)
        self.bytes_sent[rpc.value] += sum(len(p.buffer) for p in parts)

        async def requests() -> AsyncIterator[runtime_pb2.ExpertRequest]:
            yield runtime_pb2.ExpertRequest(uid=meta.stage, tensors=parts[:1], metadata=meta.pack())
            for part in parts[1:]:
                yield runtime_pb2.ExpertRequest(tensors=[part])

        stream = await self.p2p.iterate_protobuf_handler(
            peer, handler_name(self.run, rpc), requests(), runtime_pb2.ExpertResponse
        )
        metadata, response_parts, received = await read_answer(stream, self.max_response_bytes)
        self.bytes_received[rpc.value] += received
        return metadata, response_parts

    def _check_outputs(self, kind: StageKind, rpc: Rpc, batch_shape: torch.Size, outputs: list[torch.Tensor]) -> None:
        expected = response_fields(kind, rpc)
        if len(outputs) != len(expected):
            raise StageCallFailed(f"expected {len(expected)} tensors ({', '.join(expected)}), got {len(outputs)}")
        for name, tensor in zip(expected, outputs):
            if tuple(tensor.shape[:2]) != tuple(batch_shape[:2]) or not tensor.is_floating_point():
                raise StageCallFailed(f"{name} is {tensor.dtype} {list(tensor.shape)}, batch is {list(batch_shape[:2])}")
            if name == "boundary":
                width = self.boundary_width + id_slots(tensor.dtype)
                if tensor.ndim != 3 or tensor.shape[2] != width:
                    raise StageCallFailed(f"boundary has shape {list(tensor.shape)}, expected width {width}")
                tensor = unpack_boundary(tensor, self.boundary_width)[0]  # ids are bit patterns, not numbers
            if not bool(torch.isfinite(tensor).all()):
                raise StageCallFailed(f"{name} holds NaN or Inf")
