"""A stage's weights under a precision policy: what the model computes with, what the optimizer steps.

The model computes with ``params`` on its device in the compute dtype. The optimizer steps float32
``masters``: the params themselves in a float32 run whose masters stay on the device, float32 copies
otherwise (on the CPU when the policy offloads them, with the optimizer's state). Gradients travel:

    backward of one micro-batch → param.grad (compute dtype)
    completed micro-batch        → sums (float32, on the device), param.grad freed
    failed micro-batch           → param.grad dropped: nothing of it reaches the sums
    end of epoch                 → sums / micro-batches, clipped → master.grad → optimizer step → params

so a backward that fails half-way (out of memory) leaves no partial gradient behind, and an epoch's
gradient is summed in float32 whatever the compute dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from agora_server.models.precision import PrecisionConfig
from agora_server.optim.local import clip_gradients


class MasterWeights:
    def __init__(self, module: nn.Module, precision: PrecisionConfig, device: torch.device):
        """Moves ``module`` (built in float32 on the CPU) to ``device`` in the compute dtype; the float32
        values it was built with become the masters where they are kept apart."""
        named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        device = torch.device(device)
        if precision.separate_master:
            master_device = torch.device("cpu") if precision.master_weights == "cpu" else device
            # .to returns the very tensor when it is already there: the built values, not a copy
            self.masters = [p.detach().to(master_device, torch.float32) for p in self.params]
            for p in self.params:  # a copy even where device and dtype match: never the master's storage
                p.data = p.data.to(device, precision.torch_dtype, copy=True)
        else:
            self.masters = self.params
        module.to(device)  # buffers, and the params when they are their own masters
        self.sums = [torch.zeros(p.shape, dtype=torch.float32, device=device) for p in self.params]
        self.batches = 0
        self.version = 0
        """Counts the changes of the weights the model computes with: every change (a step, an averaging
        round, a load) ends with ``push``. A graph kept from a forward runs only on its own version."""

    @property
    def named_masters(self) -> list[tuple[str, torch.Tensor]]:
        return list(zip(self.names, self.masters))

    def accumulate(self) -> None:
        """Add the micro-batch whose backward just completed to the epoch's sums."""
        with torch.no_grad():
            for p, total in zip(self.params, self.sums):
                if p.grad is not None:
                    total.add_(p.grad)
                    p.grad = None
        self.batches += 1

    def discard(self) -> None:
        """Forget the gradient of a micro-batch whose backward did not complete."""
        for p in self.params:
            p.grad = None

    def step(self, optimizer: torch.optim.Optimizer, lr: float, max_norm: float | None,
             combine: Callable[[list[torch.Tensor], int], object] | None = None) -> float:
        """The epoch's optimizer step on the mean gradient of its micro-batches; returns the gradient's
        norm before clipping. ``combine(means, batches)`` may replace the mean in place first (by the
        stage's, averaged with the other workers). A norm that is not finite skips the step: one bad
        micro-batch must not poison the weights. The sums start again from zero either way."""
        with torch.no_grad():
            for total in self.sums:
                total.div_(max(self.batches, 1))
            if combine is not None:
                combine(self.sums, self.batches)
            norm = clip_gradients(self.sums, max_norm)
            if math.isfinite(norm):
                for master, total in zip(self.masters, self.sums):
                    if master.device == total.device:
                        master.grad = total
                    else:
                        if master.grad is None:  # kept between steps: allocated once
                            master.grad = torch.empty_like(master)
                        master.grad.copy_(total)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.step()
                self.push()
            for master, total in zip(self.masters, self.sums):
                if master.grad is total:
                    master.grad = None
                total.zero_()
        self.batches = 0
        return norm

    def push(self) -> None:
        """Copy the masters into the weights the model computes with (after a step, an averaging
        round or a load); nothing to copy where they are the same tensors."""
        self.version += 1
        if self.masters is self.params:
            return
        with torch.no_grad():
            for p, master in zip(self.params, self.masters):
                # convert on the master's side: a float32 copy of the largest weight never lands on the GPU
                p.copy_(master if master.device == p.device else master.to(p.dtype))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The float32 weights by the model's parameter names (what a checkpoint keeps)."""
        return dict(self.named_masters)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.names) - set(state)
        unexpected = set(state) - set(self.names)
        if missing or unexpected:
            raise KeyError(f"the stage state does not match this stage: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
        with torch.no_grad():
            for name, master in self.named_masters:
                master.copy_(state[name])
        self.push()
