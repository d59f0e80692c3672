"""Health rules: a worker that cannot do useful work stops itself and says what to fix.

``HealthMonitor`` subscribes to the worker's events like every other consumer. The first rule that
fires emits ``HealthStop`` with the participant guide's message (where the guide has one) and calls
``on_stop``; the worker then shuts down cleanly and exits non-zero.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agora_server.telemetry import events as ev

RAM_MESSAGE = "RAM usage exceeded threshold. Exiting run."
ALLREDUCE_MESSAGE = "Too many failed all-reduce attempts. Exiting run."
CUDA_MESSAGE = "Failed to connect to CUDA. Exiting run."
NON_FINITE_MESSAGE = "Gradients stayed NaN or infinite for {count} optimizer steps in a row. Exiting run."
NO_PROGRESS_MESSAGE = "No training progress for {seconds:.0f}s. Exiting run."
COORDINATOR_MESSAGE = "The coordinator asked this node to leave the run. Exiting run."
ACCESS_EXPIRED_MESSAGE = "Lost contact with the coordinator and this node's access expired. Exiting run."


class HealthConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_ram_percent: float = Field(95.0, gt=0, le=100)
    """System RAM in use (percent) above which the worker stops before the OS kills it (-9)."""
    max_failed_rounds: int = Field(5, gt=0)
    """Failed averaging rounds, among the last ``failed_rounds_window``, that stop the worker."""
    failed_rounds_window: int = Field(8, gt=0)
    max_non_finite_steps: int = Field(5, gt=0)
    """Consecutive epochs whose gradients were not finite (each such step is skipped)."""
    no_progress_seconds: float = Field(1800.0, gt=0)
    """Seconds without a forward, a backward or a new epoch before the worker gives up."""

    @model_validator(mode="after")
    def _window_holds_the_limit(self) -> HealthConfig:
        if self.failed_rounds_window < self.max_failed_rounds:
            raise ValueError(
                f"health.failed_rounds_window ({self.failed_rounds_window}) must be at least "
                f"health.max_failed_rounds ({self.max_failed_rounds})"
            )
        return self


class HealthMonitor:
    """EventBus subscriber applying the rules; ``check_idle`` is called on the worker's tick."""

    def __init__(
        self,
        config: HealthConfig,
        emit: Callable[[ev.Event], None],
        on_stop: Callable[[ev.HealthStop], None] = lambda verdict: None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.config, self.emit, self.on_stop, self.clock = config, emit, on_stop, clock
        self.verdict: ev.HealthStop | None = None
        self._rounds: collections.deque[bool] = collections.deque(maxlen=config.failed_rounds_window)
        self._non_finite_in_a_row = 0
        self._last_work: tuple[int, int, int] | None = None
        self._last_progress = clock()
        self._lock = threading.Lock()

    def __call__(self, event: ev.Event) -> None:
        if isinstance(event, ev.WorkerStats):
            self._on_stats(event)
        elif isinstance(event, ev.AveragingRound) and event.attempted and event.partner_online:
            self._rounds.append(event.ok)
            failed = self._rounds.count(False)
            if failed >= self.config.max_failed_rounds:
                self._stop("averaging", ALLREDUCE_MESSAGE, f"{failed} of the last {len(self._rounds)} averaging rounds failed; last: {event.reason}")
        elif isinstance(event, ev.NonFiniteGradients):
            self._non_finite_in_a_row += 1
            if self._non_finite_in_a_row >= self.config.max_non_finite_steps:
                count = self._non_finite_in_a_row
                self._stop("non_finite_gradients", NON_FINITE_MESSAGE.format(count=count), f"last gradient norm {event.grad_norm}")
        elif isinstance(event, ev.OptimizerStepped):
            self._non_finite_in_a_row = 0
        elif isinstance(event, ev.ComputeFailed) and event.cuda:
            self._stop("cuda", CUDA_MESSAGE, f"{event.rpc}: {event.error}")
        elif isinstance(event, ev.CoordinatorStop):
            self._stop("coordinator", ACCESS_EXPIRED_MESSAGE if event.access_expired else COORDINATOR_MESSAGE, event.reason)

    def _on_stats(self, stats: ev.WorkerStats) -> None:
        if stats.ram_used_percent > self.config.max_ram_percent:
            detail = f"{stats.ram_used_percent:.1f}% of system RAM in use; the threshold is {self.config.max_ram_percent:g}%"
            self._stop("ram", RAM_MESSAGE, detail)
            return
        work = (stats.forward_batches + stats.backward_batches, stats.epoch, stats.samples)
        if work != self._last_work:
            self._last_work, self._last_progress = work, self.clock()
        self.check_idle()

    def check_idle(self) -> None:
        idle = self.clock() - self._last_progress
        if idle > self.config.no_progress_seconds:
            self._stop("no_progress", NO_PROGRESS_MESSAGE.format(seconds=idle), "no requests served and no epoch completed")

    def _stop(self, rule: str, message: str, detail: str) -> None:
        with self._lock:
            if self.verdict is not None:
                return  # the first rule to fire explains the exit
            self.verdict = ev.HealthStop(rule=rule, message=message, detail=detail)
        self.emit(self.verdict)
        self.on_stop(self.verdict)
