"""SPARTA averaging of one stage's weights with the other workers of the stage, on hivemind's
DecentralizedAverager (matchmaking in the DHT, butterfly all-reduce, timeouts).

Every ``average_every`` epochs a worker averages one slice (a fraction p of every tensor) in a
background thread while it keeps training. The averager's buffers are sized for the largest
slice; a round copies its slice in, matches only with peers averaging the same slice (the slice
index is the matchmaking group key), and lands the result with the delta rule. Weights are the
samples each peer processed since its last round, so a newcomer (weight 0) only receives. A round
whose result is not finite, or moves any weight by more than ``max_update``, is refused whole.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future

import torch
from hivemind import DHT
from hivemind.averaging import DecentralizedAverager
from hivemind.compression import CompressionInfo
from pydantic import BaseModel, ConfigDict, Field, model_validator

from agora_server.optim.sparta import SpartaPartition, slice_for_epoch

logger = logging.getLogger(__name__)


class AveragingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    """Average with the stage's other workers. Off, each worker drifts on its own."""
    fraction: float = Field(0.05, gt=0, le=1)
    """p: the share of every tensor averaged per round; every weight is averaged once per ⌈1/p⌉ rounds."""
    average_every: int = Field(5, gt=0)
    """Epochs between rounds."""
    matchmaking_time: float = Field(5.0, gt=0)
    """Seconds a round waits for peers to join its group (production: 25-40)."""
    averaging_timeout: float = Field(60.0, gt=0)
    """Seconds a whole round may take before it counts as failed (production: 60-150)."""
    request_timeout: float = Field(3.0, gt=0)
    """Seconds to wait for one peer's answer before it is left out of the round."""
    sender_timeout: float = Field(10.0, gt=0)
    """Seconds a peer may fall silent mid-round before the group bans it from the round and finishes
    without its part (results it owes: twice this)."""
    target_group_size: int | None = Field(None, ge=2)
    """Split large stages into groups of about this many peers per round; None averages with all."""
    max_update: float = Field(1.0, gt=0)
    """A round that would move any weight by more than this is refused (a peer sent absurd values)."""
    warmup_rounds: int = Field(2, ge=0)
    """Rounds a newcomer averages with weight 0 (receiving only) before trainers route to it."""

    @model_validator(mode="after")
    def _request_timeout_within_matchmaking(self) -> AveragingConfig:
        # hivemind's matchmaking can deadlock when one peer's answer may take longer than the window
        if self.request_timeout >= self.matchmaking_time:
            raise ValueError(
                f"averaging.request_timeout ({self.request_timeout}) must be shorter than averaging.matchmaking_time "
                f"({self.matchmaking_time}); lower the first or raise the second"
            )
        return self


StateProvider = Callable[[], tuple[dict, list[torch.Tensor]]]


class _StageStateAverager(DecentralizedAverager):
    """Serves the stage's full weights to newcomers (``load_state_from_peers``) from the worker process."""

    state_provider: StateProvider | None = None
    round_running: threading.Event | None = None

    def get_current_state(self):
        if self.state_provider is None:
            raise RuntimeError("this worker does not share its state yet")
        if self.round_running is not None and self.round_running.is_set():
            # no joins at an averaging boundary: the slice being averaged is about to change
            raise RuntimeError("an averaging round is running; ask again in a moment")
        metadata, tensors = self.state_provider()
        return metadata, tensors, [CompressionInfo.from_tensor(t) for t in tensors]


@dataclasses.dataclass(frozen=True)
class RoundResult:
    epoch: int
    slice_index: int
    ok: bool
    group_size: int
    reason: str = ""
    attempted: bool = True


class SpartaAverager:
    """Background SPARTA rounds for a list of parameters.

    ``on_compute`` runs a function on the thread that owns the parameters (the stage's compute
    thread) and returns its Future: snapshots and updates never interleave with a backward.
    """

    def __init__(
        self,
        dht: DHT,
        prefix: str,
        params: Sequence[torch.Tensor],
        config: AveragingConfig,
        seed: int,
        on_compute: Callable[[Callable[[], object]], Future],
        on_result: Callable[[RoundResult], None] = lambda result: None,
        epoch: int = 0,
        has_partners: Callable[[], bool] = lambda: True,
    ):
        self.params, self.config, self.on_compute, self.on_result = list(params), config, on_compute, on_result
        self.has_partners = has_partners
        self.partition = SpartaPartition([p.numel() for p in self.params], config.fraction, seed)
        slices = self.partition.slices
        self._lengths = [[len(self.partition.indices(i, r)) for r in range(slices)] for i in range(len(self.params))]
        buffers = [torch.zeros(max(lengths), dtype=torch.float32) for lengths in self._lengths]
        self._bits = max(1, math.ceil(math.log2(slices))) if slices > 1 else 0
        self.averager = _StageStateAverager(
            buffers,
            dht,
            prefix=f"{prefix}_sparta".replace(".", "_"),  # hivemind group keys use "." as a separator
            start=True,
            min_matchmaking_time=config.matchmaking_time,
            request_timeout=config.request_timeout,
            allreduce_timeout=config.averaging_timeout,
            sender_timeout=config.sender_timeout,
            target_group_size=config.target_group_size,
            min_group_size=2,
            initial_group_bits="0" * self._bits,
            allow_state_sharing=False,  # until this worker holds the stage's current weights
        )
        self._round_running = threading.Event()
        self.averager.round_running = self._round_running
        self._control = None
        self._closed = False
        self._busy = threading.Lock()
        self.rounds_ok = self.rounds_failed = self.last_group_size = 0
        self._last_window = epoch // config.average_every  # a resumed worker does not redo its last window

    def share_state(self, provider: StateProvider) -> None:
        """Let newcomers download the stage's weights from this worker."""
        self.averager.state_provider = provider
        self.averager.allow_state_sharing = True

    def download_state(self, timeout: float, attempts: int = 5, pause: float = 2.0) -> tuple[dict, list[torch.Tensor]] | None:
        """Weights and metadata from a peer of the stage; None if none answered in ``attempts`` tries.
        Peers refuse while one of their rounds runs, so a refusal is worth another try."""
        for attempt in range(attempts):
            state = self.averager.load_state_from_peers(timeout=timeout)
            if state is not None:
                return state
            if attempt + 1 < attempts:
                time.sleep(pause)
        return None

    def follow(self, epoch: int) -> None:
        """This worker jumped to ``epoch`` (state downloaded from a peer): the window it lands in has
        had its round already."""
        self._last_window = max(self._last_window, epoch // self.config.average_every)

    def maybe_start_round(self, epoch: int, weight: float) -> Future | None:
        """Start the round of the ``average_every`` window ``epoch`` has just entered, in the background.

        A worker that jumped over a window's first epoch (it followed a stage that moved on) still
        runs that window's round, with the same slice as its peers. A round still running when the
        next one is due makes that one skipped and counted as failed: rounds are too frequent for
        this stage's epoch time, and the log says so."""
        window = epoch // self.config.average_every
        if self._closed or window <= self._last_window:
            return None
        self._last_window = window
        if not self._busy.acquire(blocking=False):
            self.rounds_failed += 1
            index = slice_for_epoch(epoch, self.config.average_every, self.partition.slices)
            self.on_result(RoundResult(epoch, index, False, 0, "skipped: the previous round was still running", attempted=False))
            return None
        # a daemon thread, not a pool: a round blocked on an averager that is shutting down must not
        # hold up the process's exit (pool threads are joined at interpreter exit)
        future: Future = Future()

        def run() -> None:
            try:
                future.set_result(self._round_and_release(epoch, weight))
            except BaseException as e:
                future.set_exception(e)

        threading.Thread(target=run, name=f"sparta-{epoch}", daemon=True).start()
        return future

    def _round_and_release(self, epoch: int, weight: float) -> RoundResult | None:
        try:
            if not self.has_partners():  # a worker alone on its stage has nobody to average with: no round, no failure
                return None
            self._round_running.set()
            result = self.run_round(epoch, weight)
        except Exception as e:  # a failed round must never take the worker down
            if self._closed:
                return None  # cancelled because the worker is stopping: not a failure of the network
            logger.warning("averaging round at epoch %d failed", epoch, exc_info=True)
            result = RoundResult(epoch, -1, False, 0, f"{type(e).__name__}: {e}")
        finally:
            self._round_running.clear()
            self._busy.release()
        if result.ok:
            self.rounds_ok += 1
            self.last_group_size = result.group_size
        else:
            self.rounds_failed += 1
        self.on_result(result)
        return result

    def run_round(self, epoch: int, weight: float) -> RoundResult:
        index = slice_for_epoch(epoch, self.config.average_every, self.partition.slices)
        snapshot = self.on_compute(lambda: self.partition.gather(self.params, index)).result()
        if not self._may_contribute(snapshot):
            return RoundResult(epoch, index, False, 0, "own weights are not finite; not contributing")
        with self.averager.get_tensors() as buffers:
            for buffer, values in zip(buffers, snapshot):
                buffer.zero_()
                buffer[: len(values)] = values.float()
        if self._bits:
            self.averager.set_group_bits(format(index, f"0{self._bits}b"))
        # give up finding a group soon after the matchmaking window, so a round with no partner
        # does not block the next ones; the whole round gets a deadline of its own as well, since a
        # step whose group breaks up mid-way has been seen to outlive every hivemind timeout
        find_group_within = 2 * self.config.matchmaking_time + self.config.request_timeout
        control = self._control = self.averager.step(
            weight=float(weight), gather=index, timeout=find_group_within, allow_retries=False, wait=False
        )
        try:
            group = control.result(timeout=find_group_within + self.config.averaging_timeout)
        except TimeoutError:
            control.cancel()
            return RoundResult(epoch, index, False, 0, "the round did not finish within its deadline")
        finally:
            self._control = None
        if not group:
            return RoundResult(epoch, index, False, 0, "no group formed or all-reduce failed")
        if any(slice_of_peer != index for slice_of_peer in group.values()):
            return RoundResult(epoch, index, False, len(group), "a peer averaged another slice")
        with self.averager.get_tensors() as buffers:
            averaged = [buffer[: len(values)].clone() for buffer, values in zip(buffers, snapshot)]
        problem = self._implausible(snapshot, averaged)
        if problem:
            return RoundResult(epoch, index, False, len(group), problem)
        self.on_compute(lambda: self.partition.apply_delta(self.params, index, snapshot, averaged)).result()
        return RoundResult(epoch, index, True, len(group))

    @staticmethod
    def _may_contribute(snapshot: Sequence[torch.Tensor]) -> bool:
        return all(bool(torch.isfinite(s).all()) for s in snapshot)

    def _implausible(self, snapshot: Sequence[torch.Tensor], averaged: Sequence[torch.Tensor]) -> str:
        for old, new in zip(snapshot, averaged):
            if not bool(torch.isfinite(new).all()):
                return "the average is not finite: a peer sent NaN or Inf"
            if len(new) and float((new - old.float()).abs().max()) > self.config.max_update:
                return f"the average moves a weight by more than {self.config.max_update}: a peer sent absurd values"
        return ""

    def shutdown(self) -> None:
        self._closed = True
        control = self._control
        if control is not None:
            control.cancel()  # else the round's thread, and so the process's exit, waits out its deadline
        self.averager.shutdown()
