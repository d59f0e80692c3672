"""Optimisation inside a stage.

- ``config.py``    OptimizerConfig
- ``local.py``     build_optimizer (AdamW or Nesterov), learning_rate (by epoch), clip_and_check, clip_gradients
- ``master.py``    MasterWeights: compute-dtype weights on the device, float32 masters (CPU or device), gradient sums
- ``progress.py``  StageProgress: SwarmProgress (hivemind ProgressTracker), LocalProgress
- ``progress_bounds.py``  how much of the other workers' progress records a worker believes (EpochCredit)
- ``nesterov.py``  NesterovAdamW (NAdam, decoupled weight decay), linear_momentum_warmup
- ``sparta.py``    SpartaPartition (seeded slices), slice_count, slice_for_epoch, the delta rule
- ``averaging.py`` AveragingConfig, SpartaAverager (background rounds, state sharing), BFloat16State
- ``state_download.py``  fetch_state, stream_state, ResumePoint, PartialState: a newcomer's download of the
  stage's weights (both sides of the stream), deadlines sized by bytes, progress, resumed after a drop
"""

from agora_server.optim.config import OptimizerConfig
from agora_server.optim.local import build_optimizer, clip_and_check, clip_gradients, learning_rate, make_optimizer
from agora_server.optim.master import MasterWeights
from agora_server.optim.progress import LocalProgress, StageProgress, SwarmProgress
from agora_server.optim.nesterov import NesterovAdamW, linear_momentum_warmup
from agora_server.optim.sparta import SpartaPartition, slice_count, slice_for_epoch

__all__ = [
    "LocalProgress",
    "MasterWeights",
    "NesterovAdamW",
    "OptimizerConfig",
    "SpartaPartition",
    "StageProgress",
    "SwarmProgress",
    "build_optimizer",
    "clip_and_check",
    "clip_gradients",
    "learning_rate",
    "make_optimizer",
    "linear_momentum_warmup",
    "slice_count",
    "slice_for_epoch",
]
