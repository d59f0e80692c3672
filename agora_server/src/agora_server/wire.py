"""Types shared by the stage server and the pipeline client: RPC tensor layouts and DHT records.

Neither side imports the other; both import this module (the way Petals' server and client
share ``data_structures.py``).

Tensor layouts, in order, of a stage RPC:

    forward  head: tokens                      → boundary
             body: boundary                    → boundary
             tail: boundary, labels            → loss [B, T]      (evaluation only)
    backward head: tokens, grad                → (nothing)
             body: boundary, grad              → grad_boundary
             tail: boundary, labels, loss_weights → grad_boundary, loss [B, T]

A ``boundary`` is [B, T, width + s] in the wire dtype: the codec's ``width`` numbers per token
(d dense, k subspace) followed by the token id, its int32 bit pattern stored in s = 4 / itemsize
slots (1 for float32, 2 for bfloat16). The id is bit-cast, never converted, so ids of any size
cross exactly. ``grad`` and ``grad_boundary`` are [B, T, width]: gradients need no ids.

The tail's backward runs its forward too (there is no separate tail forward in training):
``loss_weights`` is ∂L/∂loss[b, t], set by the trainer, and the per-token loss comes back
with the boundary gradient.

A head or body worker keeps the autograd graph of a training forward (``GraphUse.KEEP``) under the
caller, the trainer's session and the micro-batch, so that the backward need not run the forward
again. A backward sent with ``GraphUse.KEPT`` carries the gradient alone:

    backward head/body, kept graph: grad                → as above, or GRAPH_GONE (send the inputs)

A backward sent with its inputs (``GraphUse.NONE``) uses the kept graph when the worker still has
it and recomputes the forward otherwise; either way the answer says which (``ResponseStatus.graph``).
"""

from __future__ import annotations

import dataclasses
import time
from enum import Enum
from typing import Any

import msgpack
import torch

from agora_server.models.config import StageKind


class Rpc(str, Enum):
    FORWARD = "forward"
    BACKWARD = "backward"


class GraphUse(str, Enum):
    """What a request does with the autograd graph of its micro-batch's forward on the worker."""

    NONE = "none"
    """Forward: evaluation, nothing is kept. Backward: the stage's inputs come with the gradient; the
    worker uses the graph it kept for the micro-batch if it has one, and recomputes the forward if not."""
    KEEP = "keep"
    """Forward of a training micro-batch (head or body): keep its graph for the backward."""
    KEPT = "kept"
    """Backward with the gradient alone (head or body): run it on the kept graph, or answer GRAPH_GONE."""


GRAPH_GONE = "graph gone"
"""How a worker's answer starts when a ``GraphUse.KEPT`` backward finds no graph (the worker restarted,
the graph timed out, did not fit, or the weights stepped since): the caller sends the inputs again."""


class BackwardGraph(str, Enum):
    """How a head or body worker ran a backward: the answer's ``graph``."""

    KEPT = "kept"
    """On the graph its forward kept: one forward and one backward for the micro-batch."""
    RECOMPUTED = "recomputed"
    """It ran the forward again from the inputs sent with the backward."""


def graph_use_error(kind: StageKind, rpc: Rpc, graph: GraphUse) -> str | None:
    """Why a request may not use ``graph`` this way (None: it may). The tail keeps nothing: its
    backward runs its forward in the same call."""
    if graph is GraphUse.NONE:
        return None
    if kind is StageKind.TAIL:
        return f"the tail keeps no graph (graph use {graph.value!r}): its backward takes its inputs"
    expected = Rpc.FORWARD if graph is GraphUse.KEEP else Rpc.BACKWARD
    if rpc is not expected:
        return f"graph use {graph.value!r} is for a {expected.value}, not a {rpc.value}"
    return None


def request_fields(kind: StageKind, rpc: Rpc, graph: GraphUse = GraphUse.NONE) -> tuple[str, ...]:
    if graph is GraphUse.KEPT:
        return ("grad",)
    fields = ["tokens" if kind is StageKind.HEAD else "boundary"]
    if kind is StageKind.TAIL:
        fields.append("labels")
    if rpc is Rpc.BACKWARD:
        fields.append("loss_weights" if kind is StageKind.TAIL else "grad")
    return tuple(fields)


def response_fields(kind: StageKind, rpc: Rpc) -> tuple[str, ...]:
    if rpc is Rpc.FORWARD:
        return ("loss",) if kind is StageKind.TAIL else ("boundary",)
    if kind is StageKind.HEAD:
        return ()
    return ("grad_boundary", "loss") if kind is StageKind.TAIL else ("grad_boundary",)


@dataclasses.dataclass(frozen=True)
class RequestMeta:
    """Sent with every stage RPC next to the tensors (msgpack in ExpertRequest.metadata)."""

    run: str
    stage: str
    rpc: Rpc
    microbatch: int = -1
    access: str = ""
    """The caller's access token; a run with a coordinator refuses requests without a valid one."""
    graph: GraphUse = GraphUse.NONE
    session: str = ""
    """Set by the trainer once per run of it, so that a restarted trainer's micro-batch numbers never
    meet the graphs its previous run left on a worker."""

    def pack(self) -> bytes:
        return msgpack.packb({"run": self.run, "stage": self.stage, "rpc": self.rpc.value, "mb": self.microbatch, "access": self.access,
                              "graph": self.graph.value, "session": self.session})

    @classmethod
    def unpack(cls, raw: bytes) -> "RequestMeta":
        try:
            data = msgpack.unpackb(raw)
            meta = cls(run=str(data["run"]), stage=str(data["stage"]), rpc=Rpc(data["rpc"]), microbatch=int(data["mb"]),
                       access=str(data.get("access", "")), graph=GraphUse(data.get("graph", GraphUse.NONE.value)),
                       session=str(data.get("session", "")))
        except Exception as e:
            raise ValueError(f"malformed request metadata ({type(e).__name__})") from None
        if len(meta.session) > MAX_SESSION_CHARS:
            raise ValueError(f"session of {len(meta.session)} characters exceeds {MAX_SESSION_CHARS}")
        return meta


MAX_SESSION_CHARS = 64
"""A trainer's session id is 16 hex digits; a worker keeps it with each graph, so it is bounded."""


_ID_BYTES = 4


def id_slots(wire_dtype: torch.dtype) -> int:
    """Wire-dtype slots that hold one token id's int32 bit pattern."""
    return _ID_BYTES // wire_dtype.itemsize


def pack_boundary(values: torch.Tensor, tokens: torch.Tensor, wire_dtype: torch.dtype) -> torch.Tensor:
    """[B, T, width] values and [B, T] ids → [B, T, width + id_slots] in the wire dtype."""
    ids = tokens.to(torch.int32).contiguous().view(wire_dtype).view(*tokens.shape, id_slots(wire_dtype))
    return torch.cat([values.to(wire_dtype), ids], dim=-1)


def unpack_boundary(packed: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of pack_boundary: (values [B, T, width], ids int64 [B, T])."""
    ids = packed[..., width:].contiguous().view(torch.int32).squeeze(-1)
    return packed[..., :width], ids.to(torch.int64)


def gradient_to_wire(tensors, wire_dtype: torch.dtype) -> list[torch.Tensor]:
    """Boundary gradients ([B, T, width]) travel in the wire dtype; labels, loss weights and
    per-token losses keep their own exact dtype."""
    return [t.to(wire_dtype) if t.is_floating_point() and t.ndim == 3 else t for t in tensors]


def pack_ok(parts: int, graph: BackwardGraph | None = None, kept: bool = False) -> bytes:
    """A successful answer's status, with the number of tensor parts the answer holds (this message's
    included): the caller reads that many, then closes the stream (see ``answer_parts``). ``graph``: how
    a head or body worker ran a backward (None for a forward or the tail's backward); ``kept``: a
    training forward's graph was kept for its backward."""
    answer: dict = {"ok": True, "parts": parts}
    if graph is not None:
        answer["graph"] = graph.value
    if kept:
        answer["kept"] = True
    return msgpack.packb(answer)


def pack_error(message: str) -> bytes:
    return msgpack.packb({"error": message})


@dataclasses.dataclass(frozen=True)
class ResponseStatus:
    error: str | None
    """None for a successful answer, else why it failed."""
    graph: BackwardGraph | None = None
    kept: bool = False
    """A training forward's graph waits on the worker: send the backward there with the gradient alone."""


def unpack_response(raw: bytes) -> ResponseStatus:
    """Every answer starts with a status: an empty one means the stream closed before the worker
    replied (e.g. it died)."""
    if not raw:
        return ResponseStatus("failed: the connection closed before the worker answered")
    try:
        data = msgpack.unpackb(raw)
    except Exception:
        return ResponseStatus("failed: malformed response metadata")
    if not isinstance(data, dict):
        return ResponseStatus("failed: malformed response metadata")
    if data.get("ok") is not True:
        return ResponseStatus(str(data.get("error", "failed: answer without a status")))
    try:
        return ResponseStatus(None, BackwardGraph(data["graph"]) if "graph" in data else None, data.get("kept") is True)
    except ValueError:
        return ResponseStatus("failed: malformed response metadata")


def unpack_response_error(raw: bytes) -> str | None:
    """None for a successful answer, else why it failed."""
    return unpack_response(raw).error


def answer_parts(raw: bytes) -> int | None:
    """How many tensor parts an answer whose first message carries ``raw`` holds: what a successful answer
    declares, none for a refusal or failure; None if it does not say (then the answer ends with the stream).

    The caller, not the worker, closes a stream once the answer is in: a stream closed first by the
    answering side sometimes lost the answer's last bytes between the two p2p daemons (the answering
    daemon's close raced a reset of the same stream), which the trainer saw as "the connection closed
    before the worker answered" about once in a thousand calls, and banned an honest worker for."""
    try:
        data = msgpack.unpackb(raw)
    except Exception:
        return None
    if not isinstance(data, dict):
        return None
    if "error" in data:
        return 0
    parts = data.get("parts")
    return parts if isinstance(parts, int) and parts >= 0 else None


class ServerPhase(str, Enum):
    ONLINE = "online"
    """Routable: takes forward and backward requests."""
    CATCHING_UP = "catching_up"
    """Loading or catching up on state; trainers must not route to it."""


def stage_key(run: str, stage: str) -> str:
    """DHT key under which the workers of one stage announce themselves."""
    return f"{run}.{stage}"


@dataclasses.dataclass(frozen=True)
class StageServerInfo:
    """A worker's announcement in the DHT (subkey: its peer id). Tolerates extra fields from newer peers."""

    stage: str
    phase: ServerPhase
    throughput: float
    """Measured tokens per second of forward+backward work (0 until measured)."""
    max_batch_size: int
    wire_dtype: str
    announced_at: float = dataclasses.field(default_factory=time.time)
    started_at: float = 0.0
    """When the announcing process started: a new value means the worker restarted."""

    def to_record(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "phase": self.phase.value,
            "throughput": float(self.throughput),
            "max_batch_size": int(self.max_batch_size),
            "wire_dtype": self.wire_dtype,
            "announced_at": float(self.announced_at),
            "started_at": float(self.started_at),
        }

    @classmethod
    def from_record(cls, record: Any) -> "StageServerInfo":
        if not isinstance(record, dict):
            raise ValueError("stage server record is not a mapping")
        return cls(
            stage=str(record["stage"]),
            phase=ServerPhase(record["phase"]),
            throughput=float(record["throughput"]),
            max_batch_size=int(record["max_batch_size"]),
            wire_dtype=str(record["wire_dtype"]),
            announced_at=float(record.get("announced_at", 0.0)),
            started_at=float(record.get("started_at", 0.0)),
        )


SERVICE_NAME = "StageServicer"
"""Class name of the server's servicer: hivemind names handlers ``{namespace}::{class}.{method}``."""


def handler_name(run: str, rpc: Rpc) -> str:
    return f"{run}::{SERVICE_NAME}.rpc_{rpc.value}"
