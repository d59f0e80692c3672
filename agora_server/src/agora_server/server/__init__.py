"""The stage server: one pipeline stage served over hivemind's p2p layer.

- ``config.py``      ServerConfig
- ``validation.py``  StageSignature.validate, BadRequest, RequestLimits
- ``backend.py``     StageBackend: the module, its optimizer, forward/backward, counters
- ``checkpoint.py``  save_checkpoint / load_checkpoint (atomic, read back before it replaces, keeps the previous
                     good file; at most FILES_AT_ONCE checkpoint-sized files per identity)
- ``handler.py``     StageServicer: rpc_forward, rpc_backward, rpc_info
- ``announcer.py``   StageAnnouncer: periodic DHT record with expiry
- ``worker.py``      StageWorker: composes the above and reports progress
"""

from agora_server.server.backend import StageBackend
from agora_server.server.config import ServerConfig
from agora_server.server.handler import StageServicer
from agora_server.server.validation import BadRequest, RequestLimits, StageSignature
from agora_server.server.worker import StageWorker

__all__ = ["BadRequest", "RequestLimits", "ServerConfig", "StageBackend", "StageServicer", "StageSignature", "StageWorker"]
