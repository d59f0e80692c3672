"""Is an uploaded file a valid state of its stage? Checked before it may replace the stage's checkpoint.

The file is opened the way a newcomer will open it (``torch.load`` with ``weights_only``: no code runs)
and memory-mapped, so checking a checkpoint of many GiB holds only the pages being read. It must be a
stage state (``model``, ``optimizer``, ``epoch``); the ``model`` weights must have exactly the names,
shapes and dtypes the stage's model has (``StageLayout``, derived from the run config on the meta
device, the way a worker builds its stage), and every floating-point tensor in it must be finite.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import torch

StageLayout = dict[str, tuple[tuple[int, ...], torch.dtype]]
"""Weight name → (shape, dtype) of what a worker's checkpoint keeps under ``model``."""

MASTER_DTYPE = torch.float32
"""Checkpoints keep the float32 master weights, whatever the compute dtype."""
_CHUNK = 2**24  # elements checked at once: bounds the temporary of the finiteness check to 16 MiB
_MAX_DEPTH = 8  # optimizer state nests a few levels; deeper is not a state our optimizers write


class InvalidCheckpoint(ValueError):
    """The upload is not a valid state of its stage; the message says why (no caller text in it)."""


def stage_layouts(run_config) -> dict[str, StageLayout]:
    """Every stage's layout, built on the meta device (no memory for the weights)."""
    from agora_server.server.memory_plan import meta_stage

    layouts = {}
    for spec in run_config.stages:
        stage = meta_stage(run_config.model, spec, run_config.boundary, run_config.server, run_config.seed)
        layouts[spec.name] = {name: (tuple(p.shape), MASTER_DTYPE) for name, p in stage.named_parameters() if p.requires_grad}
    return layouts


def check_stage_state(path: Path, layout: StageLayout, epoch: int | None = None) -> int:
    """The state's epoch if ``path`` holds a valid state of the stage whose ``layout`` is given;
    InvalidCheckpoint otherwise."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        raise InvalidCheckpoint("it is not a file torch loads safely (weights only)") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict) or "optimizer" not in state:
        raise InvalidCheckpoint("it is not a stage state (model, optimizer, epoch)")
    found_epoch = state.get("epoch")
    if not isinstance(found_epoch, int) or isinstance(found_epoch, bool) or found_epoch < 0:
        raise InvalidCheckpoint("its epoch is not a non-negative integer")
    if epoch is not None and epoch != found_epoch:
        raise InvalidCheckpoint(f"it holds epoch {found_epoch}, not the {epoch} sent in X-Checkpoint-Epoch")
    weights = state["model"]
    _check_layout(weights, layout)
    for where, tensor in _tensors({"model": weights, "optimizer": state["optimizer"]}, "", 0):
        if not _finite(tensor):
            raise InvalidCheckpoint(f"{where[:120]} holds values that are not finite")
    return found_epoch


def _check_layout(weights: dict, layout: StageLayout) -> None:
    missing, unexpected = set(layout) - set(weights), set(weights) - set(layout)
    if missing or unexpected:
        raise InvalidCheckpoint(f"its weights are not the stage's: {len(missing)} missing (e.g. {sorted(missing)[:2]}), "
                                f"{len(unexpected)} unexpected")
    for name, (shape, dtype) in layout.items():
        tensor = weights[name]
        if not isinstance(tensor, torch.Tensor):
            raise InvalidCheckpoint(f"weight {name} is not a tensor")
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise InvalidCheckpoint(f"weight {name} is {tuple(tensor.shape)} {tensor.dtype}, the stage's is {shape} {dtype}")


def _tensors(value: Any, where: str, depth: int) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        yield where, value
    elif depth >= _MAX_DEPTH:
        raise InvalidCheckpoint("it nests deeper than a stage state does")
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _tensors(item, f"{where}.{key}" if where else str(key), depth + 1)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _tensors(item, f"{where}[{index}]", depth + 1)


def _finite(tensor: torch.Tensor) -> bool:
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return True
    flat = tensor.reshape(-1)
    return all(bool(torch.isfinite(chunk).all()) for chunk in flat.split(_CHUNK))
