"""A second device on a machine that has only the CPU, for code that must keep devices apart.

``on_standin_device(t)`` gives a tensor that computes on the CPU but behaves like one on a GPU: an
operation that mixes it with an ordinary tensor of one or more dimensions fails as CUDA fails
("Expected all tensors to be on the same device"), while ``copy_`` crosses between the two and
``.to("cpu")`` / ``.cpu()`` leave the stand-in device. Results of its operations stay on it.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_leaves

_CROSSING = {torch.Tensor.copy_}
_LEAVING = {torch.Tensor.cpu, torch.Tensor.to}


class StandInDeviceTensor(torch.Tensor):
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _LEAVING and _leaves_for_the_cpu(func, args, kwargs):
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs).as_subclass(torch.Tensor)
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        ours = any(isinstance(t, StandInDeviceTensor) for t in tensors)
        foreign = [t for t in tensors if not isinstance(t, StandInDeviceTensor) and t.dim() > 0]
        if ours and foreign and func not in _CROSSING:
            raise RuntimeError(
                f"Expected all tensors to be on the same device, but {func.__name__} got tensors on the stand-in device and on cpu"
            )
        return super().__torch_function__(func, types, args, kwargs)


def _leaves_for_the_cpu(func, args, kwargs) -> bool:
    if func is torch.Tensor.cpu:
        return True
    target = kwargs.get("device", next((a for a in args[1:] if isinstance(a, (str, torch.device))), None))
    return target is not None and torch.device(target).type == "cpu"


def on_standin_device(tensor: torch.Tensor) -> StandInDeviceTensor:
    return tensor.clone().as_subclass(StandInDeviceTensor)
