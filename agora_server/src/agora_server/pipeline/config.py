"""Settings of a trainer: how micro-batches are fed through the pipeline."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class TrainerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    micro_batch_size: int = Field(4, gt=0)
    """Sequences per micro-batch. Must not exceed the workers' max_batch_size."""
    data_shards: int = Field(1, gt=0)
    """Trainers the run's data is split among: each reads its own shard. The coordinator gives every
    trainer identity a shard of its own and refuses one trainer more than this. Changing it splits the
    data anew, so every trainer's saved position starts over; coordinator and trainers must agree."""
    max_in_flight: int = Field(6, gt=0)
    """Micro-batches in the pipeline at once. About 2× the number of stages keeps every stage busy."""
    max_delay_epochs: float | None = Field(0.5, gt=0)
    """How late a stage's gradients may be, in its epochs: the micro-batches every trainer keeps in
    flight add up to at most this share of ``target_batch_size``, so fewer than ``max_in_flight`` are
    sent when epochs are short. Gradients computed on weights half a step old or less cost about 2%
    of the loss in the benchmark; 1.5 steps cost 7%. None: only ``max_in_flight`` counts."""
    request_timeout: float = Field(60.0, gt=0)
    """Seconds one forward or backward call may take before the worker is considered failed."""
    max_attempts: int = Field(3, gt=0)
    """Tries per stage call (on different workers when possible) before the micro-batch is dropped."""
    ban_seconds: float = Field(15.0, gt=0)
    """How long a failed worker is avoided; doubles on repeated failures up to ``ban_max_seconds``."""
    ban_max_seconds: float = Field(300.0, gt=0)
    stage_wait_timeout: float = Field(120.0, gt=0)
    """How long a micro-batch waits for a stage that has no usable worker before it is dropped."""
    refresh_period: float = Field(5.0, gt=0)
    """Seconds between reads of the stage records in the DHT."""
    report_every: int = Field(10, gt=0)
    """Completed micro-batches between trainer reports."""
    loss_smoothing: int = Field(50, gt=0)
    """Span, in micro-batches, of the moving average behind the reported training loss. Single
    micro-batch losses swing with the text they hold; raise it for a steadier curve, lower it to see
    changes sooner."""
    validation_every: int = Field(200, ge=0)
    """Completed micro-batches between validation measurements (the held-out batches, forward only);
    also measured before the first and after the last micro-batch. 0 turns validation off."""
    validation_batches: int = Field(8, gt=0)
    """Micro-batches of held-out text per validation measurement. More gives a steadier figure and
    costs more forward passes of every stage."""
    default_throughput: float = Field(1000.0, gt=0)
    """Tokens/s assumed for a worker that has not measured its throughput yet."""
    unmeasured_claim_factor: float = Field(10.0, ge=1)
    """A worker not measured yet is believed at most this many times the best rate measured on its stage
    (or ``default_throughput``): announcing a huge throughput must not draw all the work to a liar."""


def in_flight_limit(config: TrainerConfig, target_batch_size: int, trainers: int = 1) -> int:
    """Micro-batches one of ``trainers`` keeps in the pipeline: ``max_in_flight``, lowered so that
    all trainers' micro-batches in flight hold at most ``max_delay_epochs`` of a stage's epoch (one at least)."""
    if config.max_delay_epochs is None:
        return config.max_in_flight
    allowed = int(config.max_delay_epochs * target_batch_size / (config.micro_batch_size * trainers))
    return max(1, min(config.max_in_flight, allowed))
