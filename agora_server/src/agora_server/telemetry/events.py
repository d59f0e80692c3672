"""Typed events emitted by Agora's components.

Components never format log lines themselves: they emit one of these, and the consumers
(console formatter, file log, later metrics and health rules) subscribe to an EventBus.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable


@dataclasses.dataclass(frozen=True, kw_only=True)
class Event:
    time: float = dataclasses.field(default_factory=time.time)


# --- worker ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServerStarted(Event):
    stage: str
    peer_id: str
    maddrs: tuple[str, ...]


@dataclasses.dataclass(frozen=True, kw_only=True)
class MemoryPlanned(Event):
    """What the stage needs of this GPU at the largest request it accepts (the memory plan)."""

    stage: str
    vram_bytes: int
    peak_bytes: int
    """Planned peak of the tensors on the GPU."""
    host_bytes: int
    batch: int
    seq_len: int
    checkpointing: bool
    max_batch: int
    """The largest micro-batch this GPU fits; below ``batch``, requests that large will run out of memory."""
    kept_graph_bytes: int = 0
    """What one micro-batch's graph holds from its forward to its backward (0: the tail keeps none)."""
    kept_graphs_bytes: int | None = None
    """What the kept graphs may hold together beside the peak (None: no byte limit)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerStepped(Event):
    stage: str
    step: int
    """The stage epoch this step completed (1 for the first)."""
    grad_norm: float
    lr: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class NonFiniteGradients(Event):
    stage: str
    grad_norm: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class WarmupStarted(Event):
    stage: str
    stage_epoch: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class StateDownloaded(Event):
    stage: str
    epoch: int
    ok: bool
    seconds: float = 0.0
    """From the first request to the last byte, over every try and peer."""
    resumed: bool = False
    """A dropped stream was continued from the bytes already received, not started over."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class StateDownloadProgress(Event):
    """The stage's current weights arriving from a peer of the stage (a newcomer catching up)."""

    stage: str
    bytes_done: int
    bytes_total: int
    seconds: float
    """Since this stream began."""
    resumed_at: int = 0
    """Bytes earlier streams delivered that this one continues from (0: it began at the start)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class WarmupComplete(Event):
    stage: str
    epoch: int
    requests_served: int
    """Forward and backward requests served while catching up (trainers should have sent none)."""
    timed_out: bool


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointLoaded(Event):
    stage: str
    epoch: int
    path: str
    """The file resumed from: the worker's checkpoint, its ``.prev``, or the stage's shared one."""
    unreadable: tuple[str, ...] = ()
    """``"<file>: <why>"`` for each newer checkpoint that could not be read and was skipped."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointFailed(Event):
    stage: str
    reason: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointSkipped(Event):
    """A periodic checkpoint fell due while the previous one was still being written."""

    stage: str
    epoch: int
    next_try: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class AveragingRound(Event):
    stage: str
    epoch: int
    slice_index: int
    ok: bool
    group_size: int
    reason: str
    attempted: bool = True
    """False for a round skipped because the previous one was still running (not a network failure)."""
    partner_online: bool = True
    """False for a failed round after which no other worker of the stage was announced online: there was
    nobody to average with (the last worker of a stage whose partner left), which is no failure of this
    worker's averaging and stops nothing."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class GradientsAveraged(Event):
    """The workers of a stage averaged the gradients of an epoch before stepping (``ok``), or this one
    stepped on its own (``reason``)."""

    stage: str
    epoch: int
    ok: bool
    group_size: int
    reason: str = ""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProgressReport(Event):
    stage: str
    window_seconds: float
    forward_batches: int
    backward_batches: int
    total_samples: int
    contribution_samples: int
    """This identity's contribution as the dashboard counts it (``telemetry.contribution``)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class WorkerStats(Event):
    """A worker's cumulative counters and resource use, every ``telemetry.stats_interval`` seconds:
    what metrics, health rules and contribution reports read."""

    stage: str
    peer_id: str
    epoch: int
    forward_batches: int
    backward_batches: int
    samples: int
    tokens: int
    optimizer_steps: int
    skipped_steps: int
    throughput: float
    """Tokens per second of forward+backward work (moving average)."""
    rounds_ok: int
    rounds_failed: int
    last_group_size: int
    bytes_received: dict[str, int]
    bytes_sent: dict[str, int]
    """Per RPC kind (forward, backward, info)."""
    kept_graph_backwards: int = 0
    """Backwards (head or body) that ran on the graph their forward kept."""
    recomputed_backwards: int = 0
    """Backwards (head or body) that ran their forward again (graph not kept here, freed, or outdated)."""
    graphs_held: int = 0
    graph_bytes: int = 0
    """Estimated bytes the graphs held now keep on the device."""
    ram_used_percent: float
    """System RAM in use, percent (what the RAM health rule compares)."""
    process_rss_bytes: int
    vram_allocated_bytes: int | None
    """None without a CUDA device."""
    online_seconds: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class ComputeFailed(Event):
    """A forward or backward raised; ``cuda`` when the device itself failed."""

    stage: str
    rpc: str
    error: str
    cuda: bool
    out_of_memory: bool = False
    """The device ran out of memory for this micro-batch: it was dropped, the worker goes on."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class JoiningRun(Event):
    """The node asks the coordinator for a place in the run."""

    coordinator: str
    """The coordinator's URL."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class AuthQueued(Event):
    position: int
    estimated_wait_seconds: float | None
    """None while joins are paused, or before the coordinator has seen a place free up."""
    joins_paused: bool = False


@dataclasses.dataclass(frozen=True, kw_only=True)
class AccessGranted(Event):
    username: str
    stage: str
    expires_at: float
    dashboard_url: str | None = None
    """This node's view on the run's dashboard, when the coordinator serves one."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProcessError(Event):
    """A worker or trainer cannot go on: it could not start or join, or lost its access. ``message`` says
    why and what to do."""

    tag: str
    """The console tag of the process: SERVER, AUTH or TRAINER."""
    message: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class DownloadProgress(Event):
    """The stage's weights arriving from the coordinator while the node waits in the queue."""

    bytes_done: int
    bytes_total: int | None
    bytes_per_second: float | None = None
    """Rate of this attempt so far (a resumed download counts from where it resumed)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DownloadComplete(Event):
    path: str
    size: int
    resumed_from: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointUploaded(Event):
    stage: str
    epoch: int
    ok: bool
    detail: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointUploadProgress(Event):
    """An upload of the stage's checkpoint to the coordinator is under way."""

    stage: str
    epoch: int
    sent_bytes: int
    total_bytes: int
    seconds: float
    """Since this request of the upload began."""
    resumed_at: int = 0
    """Bytes the coordinator already held when this request began (an upload continued after a dropped connection)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class CoordinatorUnreachable(Event):
    """A heartbeat or token refresh failed on the network; the worker retries with backoff."""

    action: str
    error: str
    retry_in: float
    expires_in: float | None = None
    """Seconds left on this peer's access, if it holds one: it stops then unless the coordinator answers."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class CoordinatorStop(Event):
    """The coordinator told this worker to leave the run, or (``access_expired``) could not be reached
    to renew its access before that ran out."""

    reason: str
    access_expired: bool = False


@dataclasses.dataclass(frozen=True, kw_only=True)
class HealthStop(Event):
    """A health rule fired: the worker stops and exits non-zero with ``message``."""

    rule: str
    message: str
    detail: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class RequestRefused(Event):
    stage: str
    rpc: str
    caller: str
    reason: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServerStopping(Event):
    stage: str
    reason: str


# --- seed -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class SeedListening(Event):
    """The seed's DHT is reachable: these multiaddrs are the other peers' --initial_peers."""

    maddrs: tuple[str, ...]


# --- trainer --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class WaitingForStages(Event):
    stages: tuple[str, ...]


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainingStarted(Event):
    """Every stage has a worker: the trainer sends its first micro-batches."""

    stages: tuple[str, ...]
    total_steps: int
    """Micro-batches to complete; 0 when the trainer runs until stopped."""
    in_flight: int = 0
    """Micro-batches the trainer keeps in the pipeline."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainerPaused(Event):
    """Mid-run, a stage has no usable worker: no new micro-batches are sent until one returns."""

    stages: tuple[str, ...]
    in_flight: int
    wait_limit: float
    """Seconds an in-flight micro-batch waits for a worker of such a stage before it is dropped."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainerResumed(Event):
    paused_seconds: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class WorkerBanned(Event):
    stage: str
    peer_id: str
    seconds: float
    reason: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class MicroBatchDropped(Event):
    microbatch: int
    reason: str
    data_index: int = -1
    """Its place in the trainer's data stream (-1: unknown)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class MicroBatchCompleted(Event):
    """A micro-batch went forward and backward through every stage (emitted after its data position
    is saved, so a trainer restarted after this event never trains it again)."""

    microbatch: int
    data_index: int
    """Its place in the trainer's data stream."""
    tokens_digest: str
    """Fingerprint of its token ids (``data.position.tokens_digest``)."""
    loss: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataShardChosen(Event):
    """Which shard of the run's data this trainer reads, and who chose it."""

    rank: int
    shards: int
    by_coordinator: bool
    """Assigned by the coordinator (kept for this trainer's key), or given by --rank in a run without one."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataResumed(Event):
    """A trainer took up its data stream where a saved position left it."""

    finished: int
    """Micro-batches of the stream already finished, which it goes past."""
    next_index: int
    """The first micro-batch not finished."""
    path: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataPositionDiscarded(Event):
    """A saved position could not be used; the trainer starts its stream from the beginning."""

    reason: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataPositionNotSaved(Event):
    """The trainer's data position could not be written; training goes on, and a restart would repeat
    the micro-batches finished since the last position that was saved."""

    path: str
    error: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataSourceFailed(Event):
    """Reading the training data failed; the stream is reopened after ``retry_in`` seconds."""

    error: str
    failures: int
    """Failures in a row, this one included."""
    retry_in: float
    next_index: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class ValidationMeasured(Event):
    """The mean token loss of the held-out validation batches, scored through the pipeline (forward only)."""

    step: int
    """Completed micro-batches when the measurement began."""
    loss: float
    batches: int
    tokens: int
    seconds: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainerReport(Event):
    step: int
    loss: float
    """Mean token loss of the micro-batches completed since the previous report."""
    tokens_per_second: float
    sent: int
    completed: int
    dropped: int
    retried: int
    total_steps: int = 0
    """Micro-batches the trainer will complete; 0 when it runs until stopped."""
    smoothed_loss: float | None = None
    """Exponential moving average of the micro-batch losses (``trainer.loss_smoothing``), bias-corrected."""
    validation_loss: float | None = None
    """The latest validation loss, if one was measured."""
    validation_step: int | None = None
    stages_served: int = 0
    """Stages with at least one worker the trainer can route to."""
    stages_total: int = 0
    workers: int = 0
    """Usable workers over all stages."""
    cancelled: int = 0
    """Micro-batches abandoned because the trainer was told to stop (not failures)."""
    kept_graph_backwards: int = 0
    """Head and body backwards that ran on the graph their forward kept (sent with the gradient alone)."""
    recomputed_backwards: int = 0
    """Head and body backwards whose worker ran the forward again from the inputs sent with them."""
    graph_resends: int = 0
    """Backwards sent with the gradient alone, answered that the graph was gone, and sent again with the inputs."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainerFinished(Event):
    completed: int
    sent: int
    dropped: dict[str, int]
    """Per reason; the micro-batches cancelled by a stop are under ``cancelled`` instead."""
    retried: int
    final_loss: float | None
    """Smoothed training loss at the end."""
    first_loss: float | None = None
    """Mean loss of the first micro-batches (one report's worth)."""
    validation_first: float | None = None
    validation_last: float | None = None
    cancelled: int = 0
    stopped: bool = False
    """Told to stop before completing its micro-batches (Ctrl+C, SIGTERM)."""
    seconds: float = 0.0
    """Training time, from the moment every stage had a worker."""
    tokens: int = 0
    kept_graph_backwards: int = 0
    """As in ``TrainerReport``."""
    recomputed_backwards: int = 0
    graph_resends: int = 0


Subscriber = Callable[[Event], None]


class EventBus:
    """Delivers each event to every subscriber, synchronously, from the emitting thread."""

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []
        self._lock = threading.Lock()

    def subscribe(self, subscriber: Subscriber) -> None:
        with self._lock:
            self._subscribers.append(subscriber)

    def emit(self, event: Event) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        for subscriber in subscribers:
            subscriber(event)
