"""Feeds micro-batches through the pipeline: head → bodies → tail, then backward in reverse.

Several micro-batches are in flight at once, so every stage has work (an asynchronous
pipeline: workers step on their own, gradients may be slightly stale). Each stage call goes
to the worker with the earliest expected finish; a worker that fails or times out is banned
and the call is retried on another one. A head or body worker keeps the graph of a forward when
its backward is expected before the stage's next step and says so in its answer; the backward
then goes to that worker with the gradient alone. When no worker kept the graph, that worker is
gone, or it answers that it no longer holds the graph, the backward is sent with the stage's
inputs (to that worker, or to any of the stage), and the worker runs the forward again.
The ledger counts both kinds. Every micro-batch ends in the ledger as completed or as
dropped with a reason: nothing is lost silently (micro-batches abandoned because the trainer was
told to stop count as ``cancelled``, not as failures). When a stage has no usable worker left, the
trainer pauses (sends nothing new) until one returns, rather than feeding micro-batches that
could only be dropped.

The reported training loss is a bias-corrected moving average of the micro-batch losses; the
validation loss scores a fixed list of held-out batches through the pipeline, forward only, before
the first micro-batch, every ``validation_every`` micro-batches and after the last.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import secrets
import time
from collections.abc import Callable, Iterator

import torch
from hivemind import DHT

from agora_server.access import PeerAccess
from agora_server.data.position import StreamBatch, tokens_digest
from agora_server.models.config import StageKind, StageSpec
from agora_server.pipeline.balancer import StageBalancer
from agora_server.pipeline.config import TrainerConfig
from agora_server.pipeline.directory import read_stage_records
from agora_server.caller_text import clip
from agora_server.pipeline.remote import StageAnswer, StageCaller, StageCallFailed, StageGraphGone, StageRefused
from agora_server.telemetry.events import (
    EventBus,
    MicroBatchCompleted,
    MicroBatchDropped,
    TrainerFinished,
    TrainerPaused,
    TrainerReport,
    TrainerResumed,
    TrainingStarted,
    ValidationMeasured,
    WaitingForStages,
    WorkerBanned,
)
from agora_server.wire import BackwardGraph, GraphUse, Rpc

logger = logging.getLogger(__name__)

CANCELLED = "cancelled"
"""Drop reason of the micro-batches a stopping trainer abandons: the user's stop, not a failure."""
Batch = tuple[torch.Tensor, torch.Tensor]


class MicroBatchDroppedError(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclasses.dataclass
class Ledger:
    sent: int = 0
    completed: int = 0
    retried: int = 0
    dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    kept_graph_backwards: int = 0
    """Head and body backwards that ran on the graph their forward kept."""
    recomputed_backwards: int = 0
    """Head and body backwards whose worker ran the forward again."""
    graph_resends: int = 0
    """Backwards sent again with their inputs after the worker answered that the graph was gone."""

    @property
    def in_flight(self) -> int:
        return self.sent - self.completed - sum(self.dropped.values())

    @property
    def cancelled(self) -> int:
        return self.dropped[CANCELLED]

    @property
    def failed(self) -> int:
        """Dropped for a reason other than a stop."""
        return sum(count for reason, count in self.dropped.items() if reason != CANCELLED)


class SmoothedLoss:
    """Exponential moving average with the start-up bias removed (as Adam does for its moments), so
    the first values are not pulled towards zero."""

    def __init__(self, span: int):
        self.beta = 1.0 - 2.0 / (span + 1)
        self._average = 0.0
        self._weight = 0.0

    def add(self, value: float) -> None:
        self._average = self.beta * self._average + (1 - self.beta) * value
        self._weight = self.beta * self._weight + (1 - self.beta)

    @property
    def value(self) -> float | None:
        return self._average / self._weight if self._weight else None


@dataclasses.dataclass
class TrainerSummary:
    sent: int
    completed: int
    dropped: dict[str, int]
    retried: int
    losses: list[tuple[int, float]]
    """(completed micro-batch number, its mean token loss), in completion order."""
    smoothed_losses: list[tuple[int, float]]
    """(completed micro-batch number, the smoothed training loss then), at every report."""
    validation: list[tuple[int, float]]
    """(completed micro-batches when measured, validation loss)."""
    stopped: bool
    """Told to stop before its micro-batches were done."""
    tokens: int
    """Tokens of the completed micro-batches."""
    seconds: float
    """Wall-clock seconds from the moment every stage had a worker to the end of training."""
    longest_stall: float
    """Longest time in seconds between two completions (or from the start to the first one)."""
    pauses: list[tuple[float, float]]
    """(seconds into training, length in seconds) of each pause for a stage without workers."""
    bytes_sent: dict[str, int]
    """Payload bytes this trainer sent, per RPC kind."""
    bytes_received: dict[str, int]
    boundary_bytes: dict[str, int]
    """Bytes of stage-boundary activations ("forward") and their gradients ("backward") received,
    over all stage boundaries; divide by tokens and by (stages − 1) for bytes per token per boundary."""
    kept_graph_backwards: int = 0
    recomputed_backwards: int = 0
    graph_resends: int = 0

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class PipelineTrainer:
    def __init__(
        self,
        *,
        dht: DHT,
        run: str,
        stages: list[StageSpec],
        config: TrainerConfig,
        wire_dtype: torch.dtype,
        boundary_width: int,
        events: EventBus,
        access: PeerAccess | None = None,
        on_finished: Callable[[int], None] = lambda data_index: None,
        in_flight: int | None = None,
    ):
        """``access``: this trainer's access in a run with a coordinator; its token goes with every call.
        ``in_flight``: micro-batches kept in the pipeline (default ``config.max_in_flight``; see ``in_flight_limit``).
        ``on_finished``: told the data index of every micro-batch that will not be sent again (completed,
        or dropped for a failure; not one cancelled by a stop), before the event that reports it."""
        self.access = access
        self.on_finished = on_finished
        self.in_flight = in_flight or config.max_in_flight
        self.dht, self.run, self.stages, self.config, self.wire_dtype = dht, run, stages, config, wire_dtype
        self.boundary_width = boundary_width
        self.events = events
        self.balancers = {
            s.name: StageBalancer(
                s.name,
                default_throughput=config.default_throughput,
                unmeasured_claim_factor=config.unmeasured_claim_factor,
                ban_seconds=config.ban_seconds,
                ban_max_seconds=config.ban_max_seconds,
            )
            for s in stages
        }
        self.ledger = Ledger()
        self.losses: list[tuple[int, float]] = []
        self.smoothed = SmoothedLoss(config.loss_smoothing)
        self.smoothed_losses: list[tuple[int, float]] = []
        self.validations: list[tuple[int, float]] = []
        self._total_steps = 0
        self.tokens_done = 0
        self.pauses: list[tuple[float, float]] = []
        self._last_completion = 0.0
        self._longest_stall = 0.0
        self._caller: StageCaller | None = None
        # with the micro-batch number, what a worker keeps a graph under: a restarted trainer's numbers
        # start again, its session does not
        self.session = secrets.token_hex(8)
        self._directory_updated: asyncio.Event | None = None
        self._stopping = asyncio.Event()

    # --- discovery ------------------------------------------------------------------

    async def _refresh_directory(self) -> None:
        for spec in self.stages:
            try:
                self.balancers[spec.name].update_peers(await read_stage_records(self.dht, self.run, spec.name))
            except Exception:
                continue  # a failed DHT read keeps the last view; the next refresh tries again
        self._directory_updated.set()
        self._directory_updated = asyncio.Event()

    async def _directory_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.refresh_period)
            await self._refresh_directory()

    async def _wait_for_directory_update(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._directory_updated.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    def _unserved_stages(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.stages if not self.balancers[s.name].usable())

    async def wait_for_all_stages(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        said: tuple[str, ...] = ()
        await self._refresh_directory()  # look before saying anything is missing
        while True:
            missing = self._unserved_stages()
            if not missing:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"no worker announced stage(s) {', '.join(missing)} within {timeout:.0f}s")
            if missing != said:  # once per change, not once per look
                self.events.emit(WaitingForStages(stages=missing))
                said = missing
            await self._refresh_directory()
            await self._wait_for_directory_update(min(self.config.refresh_period, 2.0))

    async def _pause_while_unserved(self, missing: tuple[str, ...], in_flight: int, started: float) -> None:
        paused_at = time.perf_counter()
        self.events.emit(TrainerPaused(stages=missing, in_flight=in_flight, wait_limit=self.config.stage_wait_timeout))
        while self._unserved_stages() and not self._stopping.is_set():
            # bans run out with time, not only with a directory read: look again at least every period
            # (a stop is noticed within that period too, as by the micro-batches waiting for a stage)
            await self._wait_for_directory_update(self.config.refresh_period)
        seconds = time.perf_counter() - paused_at
        self.pauses.append((paused_at - started, seconds))
        self.events.emit(TrainerResumed(paused_seconds=seconds))

    # --- one stage call with retries --------------------------------------------------

    async def _call_stage(self, spec: StageSpec, rpc: Rpc, tensors: list[torch.Tensor], microbatch: int, *,
                          graph: GraphUse = GraphUse.NONE, kept_on: str | None = None) -> tuple[StageAnswer, str]:
        """The answer of a worker of the stage, and which worker gave it. ``kept_on``: for a backward, the
        worker that kept the micro-batch's graph, asked first with the gradient (``tensors[-1]``) alone."""
        balancer, batch_shape = self.balancers[spec.name], tensors[0].shape[:2]
        tokens = batch_shape.numel()
        tried: list[str] = []
        refused = False
        resend_to: str | None = None
        if kept_on is not None and balancer.claim(kept_on, tokens):
            try:
                return await self._attempt(spec, kept_on, rpc, [tensors[-1]], microbatch, GraphUse.KEPT, batch_shape), kept_on
            except StageGraphGone:  # alive and answering: the inputs go to it
                self.ledger.graph_resends += 1
                resend_to = kept_on if balancer.claim(kept_on, tokens) else None
            except (StageRefused, StageCallFailed) as e:
                refused = self._ban(spec, kept_on, tokens, e)
                tried.append(kept_on)
        waited_since: float | None = None
        for attempt in range(self.config.max_attempts):
            peer, resend_to = resend_to or balancer.choose(tokens, exclude=tried), None
            while peer is None:  # nobody serves this stage right now: wait for one to (re)appear
                waited_since = waited_since or time.monotonic()
                # a stopping trainer drains what can finish; waiting for a stage to come back is not that
                if self._stopping.is_set():
                    raise MicroBatchDroppedError(CANCELLED)
                if time.monotonic() - waited_since > self.config.stage_wait_timeout:
                    raise MicroBatchDroppedError(f"no_worker:{spec.name}")
                await self._wait_for_directory_update(self.config.refresh_period * 2)
                peer = balancer.choose(tokens, exclude=tried)
            if attempt or tried:
                self.ledger.retried += 1
            try:
                return await self._attempt(spec, peer, rpc, tensors, microbatch, graph, batch_shape), peer
            except (StageRefused, StageCallFailed) as e:
                # a refusal is judged like a failure: an honest worker refuses only a malformed request,
                # which every worker of the stage then refuses too; one that refuses what others serve
                # would otherwise draw every micro-batch and drop it
                refused = self._ban(spec, peer, tokens, e)
                tried.append(peer)
        raise MicroBatchDroppedError(f"{'refused' if refused else 'failed'}:{spec.name}")

    async def _attempt(self, spec: StageSpec, peer: str, rpc: Rpc, tensors: list[torch.Tensor], microbatch: int,
                       graph: GraphUse, batch_shape: torch.Size) -> StageAnswer:
        """One request to ``peer``, whose balancer already counts it; a failure is the caller's to judge."""
        balancer, tokens = self.balancers[spec.name], batch_shape.numel()
        started = time.perf_counter()
        try:
            answer = await self._caller.request(peer, spec.name, spec.kind, rpc, tensors, timeout=self.config.request_timeout,
                                                microbatch=microbatch, graph=graph, session=self.session, batch_shape=batch_shape)
        except StageGraphGone as e:
            if graph is not GraphUse.KEPT:  # a request with its inputs needs no graph: that answer is a fault
                raise StageCallFailed(str(e)) from None
            balancer.released(peer, tokens)
            raise
        balancer.succeeded(peer, tokens, time.perf_counter() - started)
        if answer.graph is BackwardGraph.KEPT:
            self.ledger.kept_graph_backwards += 1
        elif answer.graph is BackwardGraph.RECOMPUTED:
            self.ledger.recomputed_backwards += 1
        return answer

    def _ban(self, spec: StageSpec, peer: str, tokens: int, error: Exception) -> bool:
        """Ban a worker whose call failed; True if it refused the request."""
        seconds = self.balancers[spec.name].failed(peer, tokens)
        self.events.emit(WorkerBanned(stage=spec.name, peer_id=peer, seconds=seconds, reason=clip(str(error))))
        return isinstance(error, StageRefused)

    # --- one micro-batch ----------------------------------------------------------------

    async def run_microbatch(self, microbatch: int, tokens: torch.Tensor, labels: torch.Tensor) -> float:
        """Forward and backward through every stage; returns the mean token loss."""
        *front, tail = self.stages
        # the inputs stay here until the backward: a worker that lost the graph needs them again
        stage_inputs: list[list[torch.Tensor]] = []
        kept_by: list[str | None] = []  # the worker that kept each stage's graph (None: none did)
        boundary: torch.Tensor | None = None
        for spec in front:
            inputs = [tokens] if spec.kind is StageKind.HEAD else [boundary]
            stage_inputs.append(inputs)
            answer, peer = await self._call_stage(spec, Rpc.FORWARD, inputs, microbatch, graph=GraphUse.KEEP)
            (boundary,) = answer.outputs
            kept_by.append(peer if answer.kept else None)

        valid = (labels != -100).float()
        loss_weights = valid / valid.sum().clamp(min=1.0)
        answer, _ = await self._call_stage(tail, Rpc.BACKWARD, [boundary, labels, loss_weights], microbatch)
        grad, per_token_loss = answer.outputs
        for spec, inputs, peer in zip(reversed(front), reversed(stage_inputs), reversed(kept_by)):
            answer, _ = await self._call_stage(spec, Rpc.BACKWARD, [*inputs, grad], microbatch, kept_on=peer)
            grad = answer.outputs[0] if answer.outputs else None
        return float((per_token_loss.float() * loss_weights).sum())

    async def _run_and_account(self, microbatch: int, batch: StreamBatch) -> None:
        tokens = batch.tokens
        try:
            loss = await self.run_microbatch(microbatch, tokens, batch.labels)
        except MicroBatchDroppedError as e:
            self._drop(microbatch, e.reason, batch.index)
        except asyncio.CancelledError:
            self._drop(microbatch, CANCELLED, batch.index)
            raise
        except Exception as e:  # a bug must not make a micro-batch vanish from the ledger
            self._drop(microbatch, f"error:{type(e).__name__}", batch.index)
        else:
            self.on_finished(batch.index)
            now = time.perf_counter()
            self._longest_stall = max(self._longest_stall, now - self._last_completion)
            self._last_completion = now
            self.ledger.completed += 1
            self.tokens_done += tokens.numel()
            self.losses.append((self.ledger.completed, loss))
            self.smoothed.add(loss)
            self.events.emit(MicroBatchCompleted(microbatch=microbatch, data_index=batch.index, tokens_digest=tokens_digest(tokens), loss=loss))

    def _drop(self, microbatch: int, reason: str, data_index: int) -> None:
        if reason != CANCELLED:  # a stop's micro-batches were not trained: a restart sends them again
            self.on_finished(data_index)
        self.ledger.dropped[reason] += 1
        self.events.emit(MicroBatchDropped(microbatch=microbatch, reason=reason, data_index=data_index))

    # --- validation -----------------------------------------------------------------------

    async def _score(self, tokens: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
        """Forward only through every stage: (summed token loss, tokens scored)."""
        *front, tail = self.stages
        boundary: torch.Tensor | None = None
        for spec in front:
            inputs = [tokens] if spec.kind is StageKind.HEAD else [boundary]
            (boundary,) = (await self._call_stage(spec, Rpc.FORWARD, inputs, -1))[0].outputs
        (per_token_loss,) = (await self._call_stage(tail, Rpc.FORWARD, [boundary, labels], -1))[0].outputs
        valid = labels != -100
        return float((per_token_loss.float() * valid).sum()), int(valid.sum())

    async def measure_validation(self, batches: list[Batch]) -> float | None:
        """Score the held-out batches with the stages' current weights; None if a stage failed them
        (the measurement is skipped: training goes on, and nothing enters the ledger)."""
        step, started = self.ledger.completed, time.perf_counter()
        loss_sum, counted = 0.0, 0
        try:
            for tokens, labels in batches:
                summed, count = await self._score(tokens, labels)
                loss_sum, counted = loss_sum + summed, counted + count
        except MicroBatchDroppedError as e:
            logger.warning("validation at step %d skipped: %s", step, e.reason)
            return None
        loss = loss_sum / max(counted, 1)
        self.validations.append((step, loss))
        self.events.emit(ValidationMeasured(step=step, loss=loss, batches=len(batches), tokens=counted,
                                            seconds=time.perf_counter() - started))
        return loss

    # --- the loop -------------------------------------------------------------------------

    async def train(self, batches: Iterator[StreamBatch], steps: int, stop: asyncio.Event,
                    validation: list[Batch] | None = None, total_steps: int = 0) -> TrainerSummary:
        """Run until ``steps`` micro-batches completed or ``stop`` is set; in-flight ones then finish,
        except those waiting for a stage without workers: they count as cancelled. ``validation``:
        the held-out batches (none: no validation); ``total_steps`` is what reports show as the goal
        (0: open-ended)."""
        self._stopping = stop
        self._directory_updated = asyncio.Event()
        p2p = await self.dht.replicate_p2p()
        self._caller = StageCaller(p2p, self.run, self.wire_dtype, self.boundary_width, access=self.access)
        directory = asyncio.create_task(self._directory_loop())
        tasks: set[asyncio.Task] = set()
        started = time.perf_counter()
        every = self.config.validation_every if validation else 0
        scoring: asyncio.Task | None = None  # the periodic validation running beside training
        self._total_steps = total_steps
        try:
            await self.wait_for_all_stages(self.config.stage_wait_timeout)
            self.events.emit(TrainingStarted(stages=tuple(s.name for s in self.stages), total_steps=total_steps, in_flight=self.in_flight))
            if every:  # before any update: the baseline every later measurement compares with
                await self.measure_validation(validation)
            started = self._last_completion = time.perf_counter()  # training time starts once every stage has a worker
            last_report = (started, 0, 0)  # time, tokens and completed count of the last report
            next_validation = every
            while self.ledger.completed < steps and not stop.is_set():
                if every and self.ledger.completed >= next_validation and (scoring is None or scoring.done()):
                    # beside the micro-batches, not between them: the pipeline keeps its stages busy
                    scoring = asyncio.create_task(self.measure_validation(validation))
                    next_validation = (self.ledger.completed // every + 1) * every
                missing = self._unserved_stages()
                if missing:
                    await self._pause_while_unserved(missing, len(tasks), started)
                    continue
                # a running validation takes one of the in-flight places: the workers see no more calls at once than without it
                room = self.in_flight - (1 if scoring is not None and not scoring.done() else 0)
                if len(tasks) < room and self.ledger.completed + len(tasks) < steps:
                    # tokenising can take a while: keep it off the loop that serves the RPCs
                    batch = await asyncio.to_thread(next, batches)
                    self.ledger.sent += 1
                    task = asyncio.create_task(self._run_and_account(self.ledger.sent, batch))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    continue
                stop_wait = asyncio.create_task(stop.wait())
                # woken at least every refresh period: a stage can empty while every task in flight waits for it
                await asyncio.wait([*tasks, stop_wait], timeout=self.config.refresh_period, return_when=asyncio.FIRST_COMPLETED)
                stop_wait.cancel()
                last_report = self._maybe_report(last_report)
            if tasks:  # let in-flight micro-batches finish so their updates and accounting land
                done, pending = await asyncio.wait(tasks, timeout=self.config.request_timeout * 2)
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
            if scoring is not None and not stop.is_set():
                await scoring
            if every and not stop.is_set() and (not self.validations or self.validations[-1][0] != self.ledger.completed):
                await self.measure_validation(validation)
        finally:
            if scoring is not None and not scoring.done():
                scoring.cancel()
                await asyncio.gather(scoring, return_exceptions=True)
            directory.cancel()
            await asyncio.gather(directory, return_exceptions=True)
            await p2p.shutdown()

        summary = TrainerSummary(
            sent=self.ledger.sent,
            completed=self.ledger.completed,
            dropped=dict(self.ledger.dropped),
            retried=self.ledger.retried,
            losses=self.losses,
            smoothed_losses=self.smoothed_losses,
            validation=self.validations,
            stopped=stop.is_set() and self.ledger.completed < steps,
            tokens=self.tokens_done,
            seconds=time.perf_counter() - started,
            longest_stall=self._longest_stall,
            pauses=self.pauses,
            bytes_sent=dict(self._caller.bytes_sent),
            bytes_received=dict(self._caller.bytes_received),
            boundary_bytes=dict(self._caller.boundary_bytes),
            kept_graph_backwards=self.ledger.kept_graph_backwards,
            recomputed_backwards=self.ledger.recomputed_backwards,
            graph_resends=self.ledger.graph_resends,
        )
        first = [loss for _, loss in self.losses[: self.config.report_every]]
        self.events.emit(
            TrainerFinished(
                completed=summary.completed,
                sent=summary.sent,
                dropped={reason: n for reason, n in summary.dropped.items() if reason != CANCELLED},
                retried=summary.retried,
                final_loss=self.smoothed.value,
                first_loss=sum(first) / len(first) if first else None,
                validation_first=self.validations[0][1] if self.validations else None,
                validation_last=self.validations[-1][1] if self.validations else None,
                cancelled=self.ledger.cancelled,
                stopped=summary.stopped,
                seconds=summary.seconds,
                tokens=summary.tokens,
                kept_graph_backwards=summary.kept_graph_backwards,
                recomputed_backwards=summary.recomputed_backwards,
                graph_resends=summary.graph_resends,
            )
        )
        return summary

    def _recent_loss(self) -> float | None:
        recent = [loss for _, loss in self.losses[-self.config.report_every :]]
        return sum(recent) / len(recent) if recent else None

    def _served(self) -> tuple[int, int]:
        """(stages with a usable worker, usable workers over all stages)."""
        usable = [len(self.balancers[s.name].usable()) for s in self.stages]
        return sum(1 for n in usable if n), sum(usable)

    def _maybe_report(self, last_report: tuple[float, int, int]) -> tuple[float, int, int]:
        # compared with the last report, not with the count before this wait: completions that land
        # while a batch is being prepared must not carry the count past a multiple unreported
        every = self.config.report_every
        if self.ledger.completed // every == last_report[2] // every:
            return last_report
        now = time.perf_counter()
        rate = (self.tokens_done - last_report[1]) / max(now - last_report[0], 1e-6)
        since_last = [loss for _, loss in self.losses[last_report[2]:]]
        served, workers = self._served()
        smoothed = self.smoothed.value
        self.smoothed_losses.append((self.ledger.completed, smoothed))
        validation = self.validations[-1] if self.validations else (None, None)
        self.events.emit(
            TrainerReport(
                step=self.ledger.completed,
                loss=sum(since_last) / len(since_last) if since_last else self._recent_loss(),
                tokens_per_second=rate,
                sent=self.ledger.sent,
                completed=self.ledger.completed,
                dropped=self.ledger.failed,
                retried=self.ledger.retried,
                total_steps=self._total_steps,
                smoothed_loss=smoothed,
                validation_loss=validation[1],
                validation_step=validation[0],
                stages_served=served,
                stages_total=len(self.stages),
                workers=workers,
                cancelled=self.ledger.cancelled,
                kept_graph_backwards=self.ledger.kept_graph_backwards,
                recomputed_backwards=self.ledger.recomputed_backwards,
                graph_resends=self.ledger.graph_resends,
            )
        )
        return now, self.tokens_done, self.ledger.completed
