"""Optimisation inside a stage.

- ``config.py``    OptimizerConfig
- ``local.py``     build_optimizer (AdamW or Nesterov + warm-up), clip_and_check
- ``nesterov.py``  NesterovAdamW (NAdam, decoupled weight decay), linear_momentum_warmup
- ``sparta.py``    SpartaPartition (seeded slices), slice_count, slice_for_epoch, the delta rule
"""

from agora_server.optim.config import OptimizerConfig
from agora_server.optim.local import build_optimizer, clip_and_check
from agora_server.optim.nesterov import NesterovAdamW, linear_momentum_warmup
from agora_server.optim.sparta import SpartaPartition, slice_count, slice_for_epoch

__all__ = [
    "NesterovAdamW",
    "OptimizerConfig",
    "SpartaPartition",
    "build_optimizer",
    "clip_and_check",
    "linear_momentum_warmup",
    "slice_count",
    "slice_for_epoch",
]
