"""Optimisation inside a stage.

- ``config.py``  OptimizerConfig
- ``local.py``   build_optimizer (AdamW + warm-up), clip_and_check
"""

from agora_server.optim.config import OptimizerConfig
from agora_server.optim.local import build_optimizer, clip_and_check

__all__ = ["OptimizerConfig", "build_optimizer", "clip_and_check"]
