"""Which boundary codec a run's ``BoundaryConfig`` names, built for its model."""

from __future__ import annotations

import torch

from agora_server.models.boundary import BoundaryCodec, BoundaryConfig, DenseBoundary
from agora_server.models.config import ModelConfig
from agora_server.models.subspace import SubspaceBoundary


def build_boundary_codec(config: BoundaryConfig, model: ModelConfig, seed: int, device: torch.device | None = None) -> BoundaryCodec:
    """``device``: where the codec's constants are built (default: the current default device)."""
    if config.codec == "dense":
        return DenseBoundary(model.hidden_size)
    if config.codec == "subspace":
        return SubspaceBoundary(model, config.subspace_rank(model.hidden_size), seed, device)
    raise ValueError(f"unknown boundary codec {config.codec!r}")
