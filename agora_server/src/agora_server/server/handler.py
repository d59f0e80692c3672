"""The stage's RPC handlers on hivemind's p2p layer (``rpc_forward``, ``rpc_backward``, ``rpc_info``).

Both training RPCs stream in both directions, so activations of any size fit under p2pd's
message cap. A refused or failed request is answered with an error in the response metadata
(never a dropped stream), and the handler goes on serving. In a run with a coordinator the
training RPCs serve only trainers holding a valid access token issued to their own peer id.
A training forward's graph is kept under the caller's peer id, its session and micro-batch
(``wire.GraphUse``); a backward that asks for it and finds none is answered ``GRAPH_GONE``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import AsyncIterator  # hivemind spots streaming handlers by typing.AsyncIterator hints
from concurrent.futures import Executor

import msgpack
import torch
from hivemind.p2p import P2PContext, ServicerBase
from hivemind.proto import runtime_pb2

from agora_server.access import TRAINER, AccessGuard, AccessTokenError
from agora_server.caller_text import clip
from agora_server.server.backend import GraphGone, MicroBatchOutOfMemory, StageBackend
from agora_server.server.kept_graphs import GraphKey
from agora_server.tensor_stream import FirstMessageLate, PayloadError, collect, deserialize, discard, serialize
from agora_server.server.validation import BadRequest, StageSignature
from agora_server.telemetry.events import ComputeFailed, Event, RequestRefused
from agora_server.models.config import StageKind
from agora_server.wire import GraphUse, RequestMeta, Rpc, gradient_to_wire, graph_use_error, pack_boundary, pack_error, pack_ok

logger = logging.getLogger(__name__)

CALLER_CLOSES_WITHIN_S = 5.0
"""How long a worker keeps a stream open after its answer for the caller to close it (``wire.answer_parts``
says why the caller closes); a caller that reads to the stream's end waits this long. The stream still
counts against ``MAX_STREAMS_PER_PEER`` meanwhile."""

MAX_STREAMS_PER_PEER = 32
"""Requests one peer may have open at once on a worker; a trainer keeps at most ``max_in_flight``
(16 in llama-8b) micro-batches in flight, so this refuses only a peer that opens streams to hold them."""


MAX_UNCHECKED_REQUESTS = 64
"""Requests a worker holds open at once, over all callers, whose first message (and so the caller's
access) it has not checked yet. Until then each may hold one p2p frame (``p2p_frames.MAX_FRAME_BYTES``,
8 MiB): a stranger who makes many peer ids gets no more than this many places, 512 MiB at the very most,
and that only with first frames no honest caller sends (metadata and a 1 MiB tensor chunk). An honest
request holds its place only until its first message has arrived, and none longer than
``FIRST_MESSAGE_WITHIN_S``."""

FIRST_MESSAGE_WITHIN_S = 10.0
"""How long a request's first message (its metadata and at most one 1 MiB tensor chunk) may take to
arrive: at 1 Mbit/s it takes 8 s. A stream that sends nothing is refused then, and gives its place back."""


class _UncheckedRequests:
    """How many requests are open whose first message has not been checked yet."""

    def __init__(self, most: int):
        self.most, self.open = most, 0

    @contextlib.contextmanager
    def place(self) -> Iterator[Callable[[], None]]:
        """Count one request until the block ends or the function it yields is called (its first message checked)."""
        self.open += 1
        held = True

        def checked() -> None:
            nonlocal held
            if held:
                self.open, held = self.open - 1, False

        try:
            yield checked
        finally:
            checked()


class StageServicer(ServicerBase):
    def __init__(
        self,
        run: str,
        stage: str,
        backend: StageBackend,
        signature: StageSignature,
        executor: Executor,
        wire_dtype: torch.dtype,
        emit: Callable[[Event], None],
        guard: AccessGuard | None = None,
    ):
        """``guard``: checks callers' access tokens; None in a run without a coordinator."""
        self.run, self.stage, self.backend, self.signature, self.guard = run, stage, backend, signature, guard
        self.executor, self.wire_dtype, self.emit = executor, wire_dtype, emit
        self.bytes_received: collections.Counter[str] = collections.Counter()
        self.bytes_sent: collections.Counter[str] = collections.Counter()
        self.refused: collections.Counter[str] = collections.Counter()
        self._open_streams: collections.Counter[str] = collections.Counter()
        self._unchecked = _UncheckedRequests(MAX_UNCHECKED_REQUESTS)

    async def rpc_info(self, request: runtime_pb2.ExpertUID, context: P2PContext) -> runtime_pb2.ExpertInfo:
        info = {"run": self.run, "stage": self.stage, "kind": self.signature.kind.value, "throughput": self.backend.throughput()}
        return runtime_pb2.ExpertInfo(serialized_info=msgpack.packb(info))

    async def rpc_forward(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        async for response in self._serve(Rpc.FORWARD, requests, context):
            yield response

    async def rpc_backward(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        async for response in self._serve(Rpc.BACKWARD, requests, context):
            yield response

    async def _serve(self, rpc: Rpc, requests, context: P2PContext) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        caller = str(context.remote_id)
        # each open stream may hold a request's worth of memory: one peer gets only so many at once, and
        # before its first message is checked a stream may hold a frame: all peer ids together get only so many
        if self._open_streams[caller] >= MAX_STREAMS_PER_PEER:
            yield self._refusal(rpc, caller, f"more than {MAX_STREAMS_PER_PEER} requests of this peer are open at once")
            return
        if self._unchecked.open >= self._unchecked.most:
            yield self._refusal(rpc, caller, f"more than {self._unchecked.most} requests not yet checked are open at once")
            return
        self._open_streams[caller] += 1
        try:
            with self._unchecked.place() as checked:
                async for response in self._serve_one(rpc, requests, caller, checked):
                    yield response
        finally:
            self._open_streams[caller] -= 1
            if not self._open_streams[caller]:
                del self._open_streams[caller]

    async def _serve_one(self, rpc: Rpc, requests, caller: str, checked: Callable[[], None]) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        metas: list[RequestMeta] = []

        def check_first(metadata: bytes) -> None:
            checked()  # whatever the check finds: the request no longer counts as unchecked
            metas.append(self._check_meta(rpc, metadata, caller))

        try:
            # who calls, and for what, is checked on the first message: a stranger's stream is refused
            # before its tensors are read, and nobody's is read past the request limit
            metadata, parts, received = await collect(requests, self.signature.limits.max_request_bytes,
                                                      check_metadata=check_first, first_within=FIRST_MESSAGE_WITHIN_S)
            self.bytes_received[rpc.value] += received
            (meta,) = metas
            inputs = self.signature.validate(rpc, deserialize(parts), meta.graph)
        except FirstMessageLate as e:  # its stream was abandoned mid-read: nothing more to take from it
            yield self._refusal(rpc, caller, e)
            return
        except (BadRequest, PayloadError) as e:
            yield self._refusal(rpc, caller, e)
            # read what the caller still sends, holding none of it, so that the refusal reaches it rather
            # than a stream closed under its writes; no further than an accepted request could go
            await discard(requests, self.signature.limits.max_request_bytes)
            return

        key = GraphKey(caller, meta.session, meta.microbatch)
        if rpc is Rpc.FORWARD:
            compute = lambda: self.backend.forward_keeping(inputs, key if meta.graph is GraphUse.KEEP else None)  # noqa: E731
        else:
            compute = lambda: self.backend.backward_graph(inputs, key)  # noqa: E731
        try:
            outputs, how = await asyncio.get_running_loop().run_in_executor(self.executor, compute)
        except GraphGone as e:  # not a failure: the caller sends the inputs with its next try
            yield runtime_pb2.ExpertResponse(metadata=pack_error(str(e)))
            return
        except BadRequest as e:  # a gradient that does not fit the kept graph
            yield self._refusal(rpc, caller, e)
            return
        except MicroBatchOutOfMemory as e:
            self.emit(ComputeFailed(stage=self.stage, rpc=rpc.value, error=str(e), cuda=False, out_of_memory=True))
            yield runtime_pb2.ExpertResponse(metadata=pack_error(f"failed: {e}"))
            return
        except Exception as e:
            logger.exception("stage %s failed to run %s", self.stage, rpc.value)
            self.emit(ComputeFailed(stage=self.stage, rpc=rpc.value, error=f"{type(e).__name__}: {e}", cuda=is_cuda_failure(e)))
            yield runtime_pb2.ExpertResponse(metadata=pack_error(f"failed: {type(e).__name__}: {e}"))
            return

        parts = serialize(self._to_wire(rpc, outputs, inputs.get("tokens")))
        self.bytes_sent[rpc.value] += sum(len(p.buffer) for p in parts)
        # the status travels first, so even the head's backward (no tensors) gets a definite answer
        status = pack_ok(len(parts), kept=how) if rpc is Rpc.FORWARD else pack_ok(len(parts), graph=how)
        yield runtime_pb2.ExpertResponse(tensors=parts[:1], metadata=status)
        for part in parts[1:]:
            yield runtime_pb2.ExpertResponse(tensors=[part])
        # hivemind closes the stream when this returns: leave that to the caller, who closes it once it has read
        # the whole answer (this wait is cancelled then). Only after an answer: a refused stream closes at once,
        # since one kept open has hivemind read ahead what its caller still sends
        await asyncio.sleep(CALLER_CLOSES_WITHIN_S)

    def _refusal(self, rpc: Rpc, caller: str, error: Exception | str) -> runtime_pb2.ExpertResponse:
        self.refused[rpc.value] += 1
        reason = clip(str(error))  # it may quote what the caller sent
        self.emit(RequestRefused(stage=self.stage, rpc=rpc.value, caller=caller, reason=reason))
        return runtime_pb2.ExpertResponse(metadata=pack_error(f"refused: {reason}"))

    def _to_wire(self, rpc: Rpc, outputs: list, tokens) -> list:
        if rpc is Rpc.FORWARD and self.signature.kind is not StageKind.TAIL:
            return [pack_boundary(outputs[0], tokens, self.wire_dtype)]
        return gradient_to_wire(outputs, self.wire_dtype)

    def _check_meta(self, rpc: Rpc, metadata: bytes, caller: str) -> RequestMeta:
        try:
            meta = RequestMeta.unpack(metadata)
        except ValueError as e:
            raise BadRequest(str(e)) from None
        if meta.run != self.run:
            raise BadRequest(f"this worker serves run {self.run!r}, not {meta.run!r}")
        if meta.stage != self.stage:
            raise BadRequest(f"this worker serves stage {self.stage!r}, not {meta.stage!r}")
        if meta.rpc is not rpc:
            raise BadRequest(f"metadata says {meta.rpc.value}, but {rpc.value} was called")
        if self.guard is not None:
            try:
                self.guard.check(meta.access, caller, role=TRAINER)
            except AccessTokenError as e:
                raise BadRequest(f"no access: {e}") from None
        misuse = graph_use_error(self.signature.kind, rpc, meta.graph)
        if misuse is not None:
            raise BadRequest(misuse)
        return meta


def is_cuda_failure(error: BaseException) -> bool:
    """The device or its driver failed, as opposed to running out of memory (a smaller batch fixes
    that) or a bug in the request."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(error, accelerator_error):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(mark in text for mark in ("CUDA error", "CUBLAS_STATUS", "cuDNN error", "NCCL error"))
