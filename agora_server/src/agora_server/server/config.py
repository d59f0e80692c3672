"""Settings of a stage server (worker)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from agora_server.models.precision import PrecisionConfig
from agora_server.optim.averaging import AveragingConfig
from agora_server.optim.config import OptimizerConfig
from agora_server.telemetry.health import HealthConfig


class KeptGraphsConfig(BaseModel):
    """The autograd graphs a head or body worker keeps between a micro-batch's forward and its backward."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_graphs: int = Field(32, ge=0)
    """Micro-batches whose graph a worker holds at once. A forward beyond it is served without keeping
    one, and its backward runs the forward again. Keep it at least the trainers' micro-batches in flight
    together; 0 keeps none (every backward recomputes, as before graphs were kept)."""
    max_bytes: int | None = Field(None, gt=0)
    """Bytes the kept graphs may hold together. None: on a GPU what the memory plan leaves beside one
    micro-batch's peak; on a CPU no byte limit (``max_graphs`` still bounds them)."""
    timeout: float = Field(120.0, gt=0)
    """Seconds a graph waits for its backward before it is freed (its trainer gave up or is gone). Above
    the trainer's ``request_timeout``, which bounds each call of the micro-batch's way there and back."""


class ServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_batch_size: int = Field(8, gt=0)
    """Largest micro-batch (sequences) a request may carry. On GPUs the VRAM tier sets it;
    ``--batch_size_override`` may only lower it."""
    max_request_bytes: int = Field(256 * 2**20, gt=0)
    """Requests larger than this are refused before they are decoded."""
    target_batch_size: int = Field(8, gt=0)
    """Samples (sequences) the stage's workers process between them per epoch: when the stage's
    progress record reaches it, every worker of the stage steps and the epoch advances."""
    optimizer: OptimizerConfig = OptimizerConfig()
    precision: PrecisionConfig = PrecisionConfig()
    """Compute dtype, where master weights and optimizer state live, activation checkpointing, the
    loss's chunking. ``agora_cli.py memory-plan`` shows what the choice costs on a GPU."""
    averaging: AveragingConfig = AveragingConfig()
    kept_graphs: KeptGraphsConfig = KeptGraphsConfig()
    announce_period: float = Field(10.0, gt=0)
    """Seconds between DHT announcements; records expire after twice this."""
    progress_interval: float = Field(60.0, gt=0)
    """Seconds between ``[PROGRESS]`` reports."""
    stats_interval: float = Field(15.0, gt=0)
    """Seconds between counter snapshots (``WorkerStats``): metrics pushes and the RAM and idle health checks."""
    health: HealthConfig = HealthConfig()
    cpu_threads: int | None = Field(None, gt=0)
    """torch intra-op threads; set to 1 when several workers share one CPU (local swarm)."""
    checkpoint_dir: str = "checkpoints"
    """Where the worker keeps its stage state, one file per identity; relative to the working directory."""
    checkpoint_every: int = Field(50, gt=0)
    """Epochs between checkpoints. One is also written when the worker stops."""
    allow_cpu: bool = False
    """Serve from the CPU when no CUDA device exists. Only small local runs should allow it."""
