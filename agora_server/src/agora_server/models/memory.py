"""What a stage's forward and backward allocate, counted by running them.

``ActivationMeter`` watches every operation while it is active and counts the bytes of the storages
they create for as long as those are alive. On the meta device nothing is allocated while shapes and
dtypes are exact, so the memory planner runs an 8B stage's real code (checkpointing, chunked loss,
the attention kernel's outputs) on any machine and reads the peak off the meter.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class ActivationMeter(TorchDispatchMode):
    """Peak bytes of the tensors created while active. Storages that end up as parameter gradients are
    left out of ``peak``: a memory plan books them as gradients, at their full size."""

    def __init__(self):
        super().__init__()
        self._serials = itertools.count()
        self._alive: dict[int, tuple[int, int]] = {}  # id(storage) -> (serial, bytes)
        self._timeline: list[tuple[int, int]] = []  # (serial, +bytes when created / -bytes when freed)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = id(storage)
            if key in inputs or key in self._alive:  # a view or an in-place result: nothing new
                continue
            serial, size = next(self._serials), storage.nbytes()
            self._alive[key] = (serial, size)
            self._timeline.append((serial, size))
            weakref.finalize(storage, self._freed, key).atexit = False
        return out

    def _freed(self, key: int) -> None:
        serial, size = self._alive.pop(key)
        self._timeline.append((serial, -size))

    def alive(self) -> int:
        """Bytes of the storages created while active that are still alive now."""
        return sum(size for _, size in self._alive.values())

    def peak(self, gradients: Iterable[torch.Tensor] = ()) -> int:
        """The most bytes alive at once, leaving out the storages of ``gradients`` (tensors that were
        created while the meter watched, e.g. the ``.grad`` of every parameter after a backward)."""
        excluded = {self._alive[id(g.untyped_storage())][0] for g in gradients if id(g.untyped_storage()) in self._alive}
        alive = peak = 0
        for serial, change in self._timeline:
            if serial not in excluded:
                alive += change
                peak = max(peak, alive)
        return peak
