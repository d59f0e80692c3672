"""Checks every stage request before any of it touches the model.

A request is refused, with a message that names the field and what was expected, when a
tensor has the wrong dtype, rank or shape, exceeds the size limits, or holds NaN/Inf or
out-of-range token ids.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from agora_server.models.config import StageKind
from agora_server.models.stages import IGNORE_INDEX
from agora_server.wire import GraphUse, Rpc, id_slots, request_fields, unpack_boundary

FLOAT_WIRE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class BadRequest(ValueError):
    """The caller sent something this stage cannot take. The worker keeps serving."""


@dataclasses.dataclass(frozen=True)
class RequestLimits:
    max_batch_size: int
    max_seq_len: int
    max_request_bytes: int


@dataclasses.dataclass(frozen=True)
class StageSignature:
    """What a stage's requests must look like."""

    kind: StageKind
    vocab_size: int
    boundary_width: int
    limits: RequestLimits

    def validate(self, rpc: Rpc, tensors: Sequence[torch.Tensor], graph: GraphUse = GraphUse.NONE) -> dict[str, torch.Tensor]:
        """Check a request; return its tensors by name, with a packed boundary split into
        ``boundary`` (float values) and ``tokens`` (int64 ids). A backward on a kept graph carries
        ``grad`` alone (its shape against the graph's is the backend's to check)."""
        fields = request_fields(self.kind, rpc, graph)
        if len(tensors) != len(fields):
            raise BadRequest(
                f"{self.kind.value} {rpc.value} takes {len(fields)} tensors ({', '.join(fields)}), got {len(tensors)}"
            )
        named = dict(zip(fields, tensors))
        size = sum(t.numel() * t.element_size() for t in tensors)
        if size > self.limits.max_request_bytes:
            raise BadRequest(f"request of {size} bytes exceeds the limit of {self.limits.max_request_bytes} bytes")

        first = tensors[0]
        _check_rank(fields[0], first, 2 if fields[0] == "tokens" else 3)
        batch, seq = first.shape[:2]
        if not 1 <= batch <= self.limits.max_batch_size:
            raise BadRequest(f"batch size {batch} is outside 1..{self.limits.max_batch_size}")
        if not 1 <= seq <= self.limits.max_seq_len:
            raise BadRequest(f"sequence length {seq} is outside 1..{self.limits.max_seq_len}")

        if "boundary" in named:
            packed = named.pop("boundary")
            _check_dtype("boundary", packed, FLOAT_WIRE_DTYPES)
            _check_shape("boundary", packed, (batch, seq, self.boundary_width + id_slots(packed.dtype)))
            named["boundary"], named["tokens"] = unpack_boundary(packed, self.boundary_width)
            _check_finite("boundary", named["boundary"])
        elif "tokens" in named:
            _check_dtype("tokens", named["tokens"], (torch.int64,))
        if "tokens" in named:
            _check_token_range("token ids", named["tokens"], self.vocab_size, allow_ignore=False)

        for name in ("labels", "loss_weights", "grad"):
            if name not in named:
                continue
            tensor = named[name]
            if name == "labels":
                _check_dtype(name, tensor, (torch.int64,))
                _check_shape(name, tensor, (batch, seq))
                _check_token_range(name, tensor, self.vocab_size, allow_ignore=True)
                continue
            expected = (batch, seq) if name == "loss_weights" else (batch, seq, self.boundary_width)
            _check_dtype(name, tensor, FLOAT_WIRE_DTYPES)
            _check_shape(name, tensor, expected)
            _check_finite(name, tensor)
        return named


def _check_finite(name: str, tensor: torch.Tensor) -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise BadRequest(f"{name} contains NaN or Inf values")


def _check_dtype(name: str, tensor: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if tensor.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise BadRequest(f"{name} has dtype {str(tensor.dtype).removeprefix('torch.')}, expected {names}")


def _check_rank(name: str, tensor: torch.Tensor, rank: int) -> None:
    if tensor.ndim != rank:
        raise BadRequest(f"{name} has rank {tensor.ndim}, expected {rank}")


def _check_shape(name: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    _check_rank(name, tensor, len(expected))
    if tuple(tensor.shape) != expected:
        raise BadRequest(f"{name} has shape {list(tensor.shape)}, expected {list(expected)}")


def _check_token_range(name: str, tensor: torch.Tensor, vocab_size: int, *, allow_ignore: bool) -> None:
    valid = (tensor >= 0) & (tensor < vocab_size)
    if allow_ignore:
        valid |= tensor == IGNORE_INDEX
    if not bool(valid.all()):
        raise BadRequest(f"{name} holds ids outside 0..{vocab_size - 1}")
