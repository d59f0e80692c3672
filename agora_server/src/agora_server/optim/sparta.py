"""SPARTA sparse parameter averaging: which coordinates a round averages, and how the result lands.

Each tensor is cut by a fixed random permutation, seeded from the run seed and the tensor's
position, into K = ⌈1/p⌉ slices. Round r averages slice r mod K of every tensor, so every
coordinate is averaged exactly once per K rounds, and all peers of a stage agree on the slice
without exchanging a word. The average is computed in the background while training goes on;
the delta rule then adds only the change the averaging made, θ[S] += avg[S] − snapshot[S], so
the local steps taken meanwhile are kept.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from agora_server.models.llama import seeded_generator

_PARTITION_SALT = 3_000_000


def slice_count(fraction: float) -> int:
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"the averaged fraction p must be in (0, 1], got {fraction}")
    return math.ceil(1.0 / fraction - 1e-9)


def slice_for_epoch(epoch: int, average_every: int, slices: int) -> int:
    """Which slice the averaging round at ``epoch`` takes: round(epoch / average_every) mod K."""
    return (epoch // average_every) % slices


class SpartaPartition:
    """Fixed slices of a list of tensors: ``indices(i, r)`` are tensor i's flat coordinates in round r."""

    def __init__(self, numels: Sequence[int], fraction: float, seed: int):
        self.slices = slice_count(fraction)
        self._parts: list[tuple[torch.Tensor, ...]] = []
        for position, numel in enumerate(numels):
            permutation = torch.randperm(numel, generator=seeded_generator(seed, _PARTITION_SALT, position))
            self._parts.append(torch.tensor_split(permutation, self.slices))

    def indices(self, tensor_index: int, round_index: int) -> torch.Tensor:
        return self._parts[tensor_index][round_index % self.slices]

    def gather(self, tensors: Sequence[torch.Tensor], round_index: int) -> list[torch.Tensor]:
        """Copies of this round's slice of every tensor (what goes into the averager)."""
        return [t.detach().reshape(-1)[self.indices(i, round_index)].clone() for i, t in enumerate(tensors)]

    def apply_delta(
        self,
        tensors: Sequence[torch.Tensor],
        round_index: int,
        snapshot: Sequence[torch.Tensor],
        averaged: Sequence[torch.Tensor],
    ) -> None:
        """θ[S] += avg[S] − snapshot[S], in place, for this round's slice S of every tensor."""
        with torch.no_grad():
            for i, (tensor, old, new) in enumerate(zip(tensors, snapshot, averaged)):
                flat = tensor.view(-1)
                idx = self.indices(i, round_index)
                flat.index_add_(0, idx, (new - old).to(flat.dtype))
