"""SPARTA sparse parameter averaging: which coordinates a round averages, and how the result lands.

Each tensor is cut by a fixed random permutation, seeded from the run seed and the tensor's
position, into K = ⌈1/p⌉ slices. Round r averages slice r mod K of every tensor, so every
coordinate is averaged exactly once per K rounds, and all peers of a stage agree on the slice
without exchanging a word. The average is computed in the background while training goes on;
the delta rule then adds only the change the averaging made, θ[S] += avg[S] − snapshot[S], so
the local steps taken meanwhile are kept.

The averager's side is the CPU in float32; the tensors may live on any device in any dtype. Values
cross between the two only through ``to_host`` and ``onto``, so a stage on a GPU never mixes devices.
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
            # int32 halves what the permutations hold in host memory (4 bytes per parameter); same values
            permutation = torch.randperm(numel, generator=seeded_generator(seed, _PARTITION_SALT, position), dtype=torch.int32)
            self._parts.append(torch.tensor_split(permutation, self.slices))

    def indices(self, tensor_index: int, round_index: int) -> torch.Tensor:
        return self._parts[tensor_index][round_index % self.slices]

    def gather(self, tensors: Sequence[torch.Tensor], round_index: int) -> list[torch.Tensor]:
        """This round's slice of every tensor, as float32 copies on the CPU (what goes into the averager)."""
        with torch.no_grad():
            return [to_host(self._slice_of(t, i, round_index)) for i, t in enumerate(tensors)]

    def _slice_of(self, tensor: torch.Tensor, tensor_index: int, round_index: int) -> torch.Tensor:
        flat = tensor.detach().view(-1)
        return flat[onto(flat, self.indices(tensor_index, round_index), torch.long)]

    def apply_delta(
        self,
        tensors: Sequence[torch.Tensor],
        round_index: int,
        snapshot: Sequence[torch.Tensor],
        averaged: Sequence[torch.Tensor],
    ) -> None:
        """θ[S] += avg[S] − snapshot[S], in place, for this round's slice S of every tensor (``snapshot``
        and ``averaged`` are the averager's float32 CPU values)."""
        with torch.no_grad():
            for i, (tensor, old, new) in enumerate(zip(tensors, snapshot, averaged)):
                flat = tensor.view(-1)
                flat.index_add_(0, onto(flat, self.indices(i, round_index), torch.long), onto(flat, new - old))


def to_host(values: torch.Tensor) -> torch.Tensor:
    """A float32 copy of ``values`` on the CPU, where the averager's buffers live."""
    return values.detach().to("cpu", torch.float32, copy=True)


def onto(like: torch.Tensor, values: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``values`` on ``like``'s device, in ``dtype`` (default: ``like``'s): the way CPU values reach a
    parameter, wherever it lives."""
    return like.new_empty(values.shape, dtype=dtype or like.dtype).copy_(values)
