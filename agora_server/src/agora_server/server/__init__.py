"""The stage server: one pipeline stage served over hivemind's p2p layer.

- ``config.py``      ServerConfig
- ``validation.py``  StageSignature.validate, BadRequest, RequestLimits
- ``backend.py``     StageBackend: the module, its optimizer, forward/backward, counters
- ``kept_graphs.py`` KeptGraphs: the graphs of training forwards kept for their backward (bounded, timed out)
- ``checkpoint.py``  save_checkpoint / load_checkpoint (atomic, read back before it replaces, keeps the previous
                     good file; at most FILES_AT_ONCE checkpoint-sized files per identity)
- ``checkpoint_writer.py``  CheckpointWriter: periodic checkpoints snapshotted on the compute thread, written on
                     a thread of their own, one at a time
- ``handler.py``     StageServicer: rpc_forward, rpc_backward, rpc_info
- ``announcer.py``   StageAnnouncer: periodic DHT record with expiry
- ``handler_loop.py``  HandlerLoop: the asyncio loop thread that runs the p2p handlers
- ``memory_plan.py`` plan_stage: a stage's bytes per component on a device, activation checkpointing decided
- ``partners.py``    StagePartners: the stage's other workers as the DHT announces them
- ``resume.py``      OwnCheckpoint: which state a worker starts from, and its saves after that
- ``averaging_rounds.py``  AveragingRounds: when a SPARTA round starts, its weight and report, the state newcomers download
- ``warmup.py``      Warmup: the CATCHING_UP → ONLINE state machine of a worker joining a running stage
- ``reporting.py``   WorkerReports: WorkerStats, progress reports and their cadence
- ``worker.py``      StageWorker: builds the stage and composes the above
"""

from agora_server.server.backend import StageBackend
from agora_server.server.config import ServerConfig
from agora_server.server.handler import StageServicer
from agora_server.server.validation import BadRequest, RequestLimits, StageSignature
from agora_server.server.worker import StageWorker

__all__ = ["BadRequest", "RequestLimits", "ServerConfig", "StageBackend", "StageServicer", "StageSignature", "StageWorker"]
