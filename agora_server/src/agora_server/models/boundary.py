"""The stage-boundary seam: what a stage sends to the next one, and how it is rebuilt.

A stage never ships its residual stream directly: it calls ``encode`` before sending and the
receiver calls ``decode``. Both run inside the stage's autograd graph, so the gradient that
crosses the wire backwards is the gradient of the encoded tensor. The dense codec sends the
stream as it is; the subspace codec (Protocol Models) plugs in here with a narrower ``width``.
A codec may also constrain what writes into the stream: a stage asks it for its token embedding and
its residual branches' output projections while it is built. ``codec_factory`` picks the codec.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from agora_server.models.config import ModelConfig
from agora_server.models.llama import seeded_embedding

WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


class BoundaryConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    codec: Literal["dense", "subspace"] = "dense"
    """How activations cross a stage boundary. "dense" sends the whole residual stream (the baseline);
    "subspace" sends k = hidden_size / compression_rate coefficients per token (Protocol Models)."""
    compression_rate: int = Field(16, ge=1)
    """hidden_size / k for the subspace codec. Larger saves bandwidth and costs some loss per token;
    production runs use about 100 at hidden_size 4096-5120, small models about 16-50."""
    wire_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Precision of activations and their gradients on the wire. bfloat16 halves the traffic;
    float32 keeps the swarm bit-comparable with a single process (tests, small runs)."""

    @property
    def torch_wire_dtype(self) -> torch.dtype:
        return WIRE_DTYPES[self.wire_dtype]

    def width(self, hidden_size: int) -> int:
        """Numbers per token the boundary carries besides the token id."""
        return self.subspace_rank(hidden_size) if self.codec == "subspace" else hidden_size

    def subspace_rank(self, hidden_size: int) -> int:
        rank = hidden_size // self.compression_rate
        if rank < 1:
            raise ValueError(f"compression_rate {self.compression_rate} leaves no dimension of hidden_size {hidden_size}")
        return rank


class BoundaryCodec(nn.Module):
    """Maps the residual stream h [B, T, d] to the boundary tensor [B, T, width] and back."""

    width: int

    def encode(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, boundary: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def head_embedding(self, model: ModelConfig, seed: int) -> nn.Module:
        """The head stage's token embedding: by default the model's own learned table."""
        return seeded_embedding(model, seed)

    def branch_output(self, projection: nn.Linear, seed: int, layer_index: int, which: int) -> nn.Module:
        """The projection that ends a residual branch (``which``: 0 attention, 1 MLP) of a layer whose
        stream crosses this boundary; ``projection`` is the dense one the layer was drawn with, kept by default."""
        return projection


class DenseBoundary(BoundaryCodec):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.width = hidden_size

    def encode(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return hidden

    def decode(self, boundary: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return boundary
