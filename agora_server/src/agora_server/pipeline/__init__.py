"""The pipeline client: what a trainer uses to drive micro-batches through the stages.

- ``config.py``     TrainerConfig, in_flight_limit
- ``directory.py``  read_stage_records (DHT → StageServerInfo per peer)
- ``balancer.py``   StageBalancer: earliest expected finish, bans with backoff
- ``remote.py``     StageCaller, StageAnswer, StageRefused, StageCallFailed, StageGraphGone
- ``trainer.py``    PipelineTrainer (micro-batches in flight, retries, Ledger), TrainerSummary
"""

from agora_server.pipeline.balancer import StageBalancer
from agora_server.pipeline.config import TrainerConfig, in_flight_limit
from agora_server.pipeline.remote import StageCaller, StageCallFailed, StageRefused
from agora_server.pipeline.trainer import Ledger, PipelineTrainer, TrainerSummary

__all__ = ["Ledger", "PipelineTrainer", "StageBalancer", "StageCallFailed", "StageCaller", "StageRefused", "TrainerConfig", "TrainerSummary", "in_flight_limit"]
