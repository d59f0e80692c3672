"""SPARTA averaging of one stage's weights with the other workers of the stage, on hivemind's
DecentralizedAverager (matchmaking in the DHT, butterfly all-reduce, timeouts).

Every ``average_every`` epochs a worker averages one slice (a fraction p of every tensor) in a
background thread while it keeps training. The averager's buffers are sized for the largest
slice; a round copies its slice in, matches only with peers averaging the same slice (the slice
index is the matchmaking group key), and lands the result with the delta rule. Weights are the
samples each peer processed since its last round, so a newcomer (weight 0) only receives. A peer's
weight is its own word, so it is bounded (``round_weight_bound``): a part that carries more is
refused and its sender left out of the round. A round whose result is not finite, or moves a weight
by more than ``max_update`` times its slice's scale, is refused whole.

In a run with a coordinator each peer gathers its access token with its slice index: a leader
turns away join requests from peers without worker access to this stage, and every member checks
the whole group before it sends a byte of its weights.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import AsyncIterator, Literal

import torch
from hivemind import DHT
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.matchmaking import MatchmakingException
from hivemind.compression import CompressionInfo, NoCompression
from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto import averaging_pb2, runtime_pb2
from pydantic import BaseModel, ConfigDict, Field, model_validator

from agora_server.access import WORKER, AccessGuard, AccessTokenError, PeerAccess
from agora_server.optim.sparta import SpartaPartition, slice_count, slice_for_epoch
from agora_server.optim.state_download import (
    DIGEST_KEY,
    DownloadProgress,
    PartialState,
    ResumePoint,
    download_deadline,
    fetch_state,
    state_digest,
    stream_state,
)
from agora_server.tensor_stream import bfloat16_message

MAX_CONCURRENT_STATE_DOWNLOADS = 2
"""Newcomers a worker sends the stage's weights to at once (the open downloads share one copy of them).
Others are turned away and try the next peer of the stage."""

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
    """A round that would move any weight by more than this many times its slice's scale is refused (a
    peer sent absurd values). The scale is the largest magnitude among the slice's values before the
    round, at least ``update_floor``: honest workers disagree by how far they drifted since they last
    averaged that weight, which is small beside the weights themselves, while an absolute bound of 1.0
    let one peer move an LLM's weights (magnitudes of about 0.02 to 0.2) by many times their size."""
    update_floor: float = Field(0.1, gt=0)
    """The smallest scale ``max_update`` is taken of, for slices near zero (biases early in a run). AdamW
    moves a weight by at most about lr per step: 0.1 is 330 steps at llama-8b's lr (3e-4), and 50 at
    local-tiny's (2e-3), where a weight is averaged every 16 epochs; workers on the same data mostly
    move a weight the same way, so they drift apart by far less."""
    gradient_epochs: int = Field(0, ge=0)
    """For the stage's first this many epochs its workers all-reduce their gradients before each step,
    so they step as one optimizer on the stage's whole batch; SPARTA keeps them together afterwards.
    Each epoch then waits for a round that moves twice the stage's gradient per worker: worth it early
    and on fast links. Set ``target_group_size`` to the stage's workers so a round starts as soon as
    they have all joined rather than after ``matchmaking_time``. 0: weights are only SPARTA-averaged."""
    warmup_rounds: int = Field(2, ge=0)
    """Rounds a newcomer averages with weight 0 (receiving only) before trainers route to it."""
    state_dtype: Literal["float32", "bfloat16"] = "float32"
    """Precision of the weights a worker serves to newcomers. bfloat16 halves the download (an 8B
    run's tail: 3.8 GB instead of 7.6 GB); the newcomer's float32 masters start from the rounded values.
    float32 keeps small runs bit-comparable."""
    download_min_mbit: float = Field(50.0, gt=0)
    """Slowest average rate accepted for a newcomer's download of the stage's weights: the download's
    overall deadline is its size at this rate (never less than ``averaging_timeout``). Below it the
    worker stops with the guide's "Download is too slow" message."""

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
STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class BFloat16State(NoCompression):
    """Sends each floating-point tensor of a served state as bfloat16; hivemind's receiver reads it back
    by its size (two bytes per value) whatever its own bfloat16 mode."""

    def compress(self, tensor: torch.Tensor, info: CompressionInfo, allow_inplace: bool = False) -> runtime_pb2.Tensor:
        if not tensor.is_floating_point():
            return super().compress(tensor, info, allow_inplace)
        return bfloat16_message(tensor.detach().to(torch.bfloat16))


def round_weight_bound(config: AveragingConfig, target_batch_size: int) -> float:
    """The largest weight a worker's part of a round may carry. The weight is the samples a worker
    trained since its last round; a stage counts ``target_batch_size`` samples an epoch between all its
    workers and rounds come every ``average_every`` epochs, so no worker brings much more than
    ``average_every`` epochs' batches. Twice that covers a round the worker had to skip; a worker that
    skipped more sends the bound."""
    return 2.0 * config.average_every * target_batch_size


def averager_prefix(prefix: str) -> str:
    return f"{prefix}_sparta".replace(".", "_")  # hivemind group keys use "." as a separator


def _group_bits(slices: int) -> int:
    return max(1, math.ceil(math.log2(slices))) if slices > 1 else 0


def averaging_keys(prefix: str, config: AveragingConfig) -> list[str]:
    """Every DHT key the averager of ``prefix`` writes: one matchmaking key per slice (hivemind's
    ``<prefix>.0b<group bits>``) and the state-sharing declaration ``<prefix>.all_averagers``."""
    slices, name = slice_count(config.fraction), averager_prefix(prefix)
    bits = _group_bits(slices)
    groups = [f"{name}.0b{format(index, f'0{bits}b') if bits else ''}" for index in range(slices)]
    return [*groups, f"{name}.all_averagers"]


def group_settings(config: AveragingConfig) -> dict:
    """How an averager of the stage's workers forms its groups and times its rounds (not started yet)."""
    return dict(
        start=False,
        min_matchmaking_time=config.matchmaking_time,
        request_timeout=config.request_timeout,
        allreduce_timeout=config.averaging_timeout,
        sender_timeout=config.sender_timeout,
        target_group_size=config.target_group_size,
        min_group_size=2,
    )


class _StageStateAverager(DecentralizedAverager):
    """Serves the stage's full weights to newcomers (``load_state_from_peers``) from the worker process,
    and averages only with peers admitted to its stage when ``guard`` is set."""

    state_provider: StateProvider | None = None
    round_running: threading.Event | None = None
    guard: AccessGuard | None = None
    stage: str = ""
    max_weight = math.inf
    """The largest weight a peer's part may carry (round_weight_bound); parts over it are refused."""
    members_key: str = ""
    _running_round = None
    """The DHT key the stage's workers announce themselves under; downloads are for them only."""
    _downloads = threading.BoundedSemaphore(MAX_CONCURRENT_STATE_DOWNLOADS)
    _snapshot: tuple | None = None
    _snapshot_users = 0
    _snapshot_lock: asyncio.Lock | None = None

    def _refusal(self, peer_id: str, gathered: object) -> str:
        if self.guard is None:
            return ""
        token = gathered.get("access") if isinstance(gathered, dict) else None
        try:
            self.guard.check(token, peer_id, role=WORKER, stage=self.stage)
        except AccessTokenError as e:
            return str(e)
        return ""

    async def rpc_join_group(
        self, request: averaging_pb2.JoinRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.MessageFromLeader]:  # hivemind finds its handlers by these hints
        try:
            _bandwidth, _mode, user_data = self.serializer.loads(request.gather)
            problem = self._refusal(str(context.remote_id), self.serializer.loads(user_data))
        except Exception as e:  # whatever a stranger sends, the answer is a refusal, not a crash
            problem = f"unreadable join request ({type(e).__name__})"
        if problem:
            logger.warning("refused %s from averaging: %s", context.remote_id, problem)
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for response in super().rpc_join_group(request, context):
            yield response

    async def _aggregate_with_group(self, group_info: GroupInfo, min_vector_size: int, **kwargs):
        for peer_id, gathered in zip(group_info.peer_ids, group_info.gathered):
            user_data = self.serializer.loads(self.serializer.loads(gathered)[2])
            problem = self._refusal(str(peer_id), user_data)
            if problem:
                raise MatchmakingException(f"not averaging with a group holding {peer_id}: {problem}")
        return await super()._aggregate_with_group(group_info, min_vector_size, **kwargs)

    async def rpc_aggregate_part(
        self, stream: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
    ) -> AsyncIterator[averaging_pb2.AveragingData]:  # hivemind finds its handlers by these hints
        async for message in super().rpc_aggregate_part(self._within_weight_bound(stream, context.remote_id), context):
            yield message

    async def _within_weight_bound(
        self, stream: AsyncIterator[averaging_pb2.AveragingData], sender: PeerID
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        """The parts a group member sends for averaging, each checked for the weight it carries: hivemind
        adds a part times the weight its sender wrote in it. A part over the bound ends the stream, and
        hivemind leaves the sender out of the round (the others' parts are averaged without it)."""
        async for message in stream:
            if not 0 <= message.weight <= self.max_weight:  # NaN fails too
                logger.warning("refused %s's averaging contribution: weight %r over the bound %s", sender, message.weight, self.max_weight)
                raise ValueError(f"a part's weight {message.weight!r} is over the bound {self.max_weight}")
            yield message

    async def rpc_download_state_from(
        self, request: averaging_pb2.DownloadData, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.DownloadData]:
        """The stage's state for a newcomer, continued from where its last stream stopped when this worker
        still holds that state (state_download.stream_state). It goes only to a peer announced on this
        stage (the run's DHT takes such an announcement only from a worker admitted to it), and to few at
        once: each download holds a copy. Saying nothing is hivemind's no: the newcomer asks the next peer."""
        if not self.allow_state_sharing:
            return
        if self.guard is not None and not await self._announced_on_stage(str(context.remote_id)):
            logger.warning("refused %s a download of stage %s's state: not announced on the stage", context.remote_id, self.stage)
            return
        if not self._downloads.acquire(blocking=False):
            return
        try:
            metadata, tensors, infos = await self._take_snapshot()
            try:
                for message in stream_state(metadata, tensors, infos, self.state_compression, ResumePoint.from_message(request)):
                    yield message
            finally:
                self._release_snapshot()
        finally:
            self._downloads.release()

    async def _take_snapshot(self) -> tuple:
        """The state the open downloads stream: copied from the worker when the first of them starts and
        shared by those that start while it is open, so open downloads hold one copy of the stage between
        them, not one each (a downloading newcomer meanwhile gets the state of when the first began)."""
        if self._snapshot_lock is None:
            self._snapshot_lock = asyncio.Lock()  # made here: it belongs to the averager's own event loop
        async with self._snapshot_lock:
            if self._snapshot is None:
                self._snapshot = await self._get_current_state_from_host_process()
            self._snapshot_users += 1
            return self._snapshot

    def _release_snapshot(self) -> None:
        self._snapshot_users -= 1
        if self._snapshot_users == 0:
            self._snapshot = None

    async def rpc_download_state(
        self, request: averaging_pb2.DownloadRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.DownloadData]:
        """hivemind's own download, which newcomers no longer use: served by no one, so it cannot skip
        the checks above."""
        return
        yield  # an async generator that yields nothing

    async def _announced_on_stage(self, peer_id: str) -> bool:
        try:
            found = await self.dht.get(self.members_key, latest=True, return_future=True)
        except Exception:  # no answer from the DHT is no proof of access
            return False
        return found is not None and isinstance(found.value, dict) and peer_id in found.value

    def round_with_group(self, config: AveragingConfig, weight: float, gather: dict) -> dict | None:
        """All-reduce this averager's tensors with the group it finds: each member's gathered data, or
        None if no group formed or the all-reduce failed. Past the round's deadline it is cancelled and
        TimeoutError raised. Finding a group gives up soon after the matchmaking window, so a round with
        no partner does not block the next ones; the whole round has a deadline of its own as well,
        since a step whose group breaks up mid-way has been seen to outlive every hivemind timeout."""
        find_group_within = 2 * config.matchmaking_time + config.request_timeout
        control = self._running_round = self.step(
            weight=float(weight), gather=gather, timeout=find_group_within, allow_retries=False, wait=False
        )
        try:
            return control.result(timeout=find_group_within + config.averaging_timeout)
        except TimeoutError:
            control.cancel()
            raise
        finally:
            self._running_round = None

    def cancel_round_and_shutdown(self) -> None:
        """Cancel a round in progress (else its thread, and so the process's exit, waits out its deadline), then shut down."""
        control = self._running_round
        if control is not None:
            control.cancel()
        self.shutdown()

    def _as_received(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` as a newcomer reads it back (no copy when the worker's snapshot is already in the wire dtype)."""
        if isinstance(self.state_compression, BFloat16State) and tensor.is_floating_point():
            return tensor.to(torch.bfloat16)
        return tensor

    def get_current_state(self):
        if self.state_provider is None:
            raise RuntimeError("this worker does not share its state yet")
        if self.round_running is not None and self.round_running.is_set():
            # no joins at an averaging boundary: the slice being averaged is about to change
            raise RuntimeError("an averaging round is running; ask again in a moment")
        metadata, tensors = self.state_provider()
        # hashed here, in a thread of the worker's process beside the compute thread: the newcomer checks the
        # whole state it assembled from one or more streams against it
        metadata = {**metadata, DIGEST_KEY: state_digest([self._as_received(t) for t in tensors])}
        return metadata, tensors, [CompressionInfo.from_tensor(t) for t in tensors]


def implausible_average(snapshot: Sequence[torch.Tensor], averaged: Sequence[torch.Tensor], config: AveragingConfig) -> str:
    """Why a round's result for the slice ``snapshot`` held before it must not be landed ("" if it may)."""
    for old, new in zip(snapshot, averaged):
        if not bool(torch.isfinite(new).all()):
            return "the average is not finite: a peer sent NaN or Inf"
        if not len(new):
            continue
        old = old.float()
        limit = config.max_update * max(float(old.abs().max()), config.update_floor)
        if float((new - old).abs().max()) > limit:
            return f"the average moves a weight by more than {limit:.4g} ({config.max_update} × its slice's scale): a peer sent absurd values"
    return ""


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
        access: PeerAccess | None = None,
        stage: str = "",
        on_update: Callable[[], None] = lambda: None,
        max_weight: float = math.inf,
    ):
        """``params``: the weights to average, on any device (the stage's float32 masters).
        ``max_weight``: the largest weight a peer's part may carry (round_weight_bound; the worker's
        own is cut to it).
        ``on_update`` runs on the compute thread after a round changed them (to copy them into the
        weights the model computes with). ``access`` and ``stage``: in a run with a coordinator,
        average only with workers admitted to ``stage``, presenting this worker's own token."""
        self.params, self.config, self.on_compute, self.on_result = list(params), config, on_compute, on_result
        self.dht = dht
        self.on_update = on_update
        self.access = access
        self.has_partners = has_partners
        self.partition = SpartaPartition([p.numel() for p in self.params], config.fraction, seed)
        slices = self.partition.slices
        self._lengths = [[len(self.partition.indices(i, r)) for r in range(slices)] for i in range(len(self.params))]
        buffers = [torch.zeros(max(lengths), dtype=torch.float32) for lengths in self._lengths]
        self._bits = _group_bits(slices)
        self.averager = _StageStateAverager(
            buffers,
            dht,
            prefix=averager_prefix(prefix),
            **group_settings(config),
            initial_group_bits="0" * self._bits,
            allow_state_sharing=False,  # until this worker holds the stage's current weights
            # a served state streams for minutes at production size: each chunk gets the sender's patience,
            # not a request's; the whole download has its own deadline (download_state)
            next_chunk_timeout=config.sender_timeout,
            state_compression=BFloat16State() if config.state_dtype == "bfloat16" else NoCompression(),
        )
        self._round_running = threading.Event()
        self.averager.round_running = self._round_running
        # the averager serves joins in a process of its own, forked at start: what it checks with goes in first
        self.averager.guard, self.averager.stage = (access.guard if access else None), stage
        self.averager.members_key = prefix  # the stage key: where its workers announce themselves
        self.averager.max_weight = self.max_weight = max_weight
        self.averager.run_in_background(await_ready=True)
        self._closed = False
        self._busy = threading.Lock()
        self.rounds_ok = self.rounds_failed = self.last_group_size = 0
        self._last_window = epoch // config.average_every  # a resumed worker does not redo its last window

    def share_state(self, provider: StateProvider) -> None:
        """Let newcomers download the stage's weights from this worker."""
        self.averager.state_provider = provider
        self.averager.allow_state_sharing = True

    def download_state(self, p2p: P2P, loop: asyncio.AbstractEventLoop, on_progress: Callable[[DownloadProgress], None],
                       attempts: int = 5, pause: float = 2.0, progress_every: float = 10.0) -> tuple[dict, list[torch.Tensor]] | None:
        """Weights and metadata from a peer of the stage, read through ``p2p`` on ``loop`` (the worker's
        RPC loop); None if none answered in ``attempts`` tries. Peers refuse while one of their rounds
        runs, so a refusal is worth another try; a try continues the parts earlier ones received. The
        tries together may take the state's size at ``download_min_mbit``; past that StateDownloadTooSlow
        is raised."""
        state_bytes = sum(p.numel() for p in self.params) * STATE_DTYPES[self.config.state_dtype].itemsize
        deadline = download_deadline(state_bytes, self.config.download_min_mbit, self.config.averaging_timeout)
        shapes = [p.shape for p in self.params]
        started = time.monotonic()
        partial = PartialState()  # what a try received, continued by the next one
        known: list[PeerID] = []
        for attempt in range(attempts):
            # peers seen before stay candidates: after the node's own link dropped, its DHT may not find
            # them again for a while (hivemind backs off from peers that failed), yet they still serve
            peers = self._sharing_peers()
            known = peers + [peer for peer in known if peer not in peers]
            fetch = fetch_state(p2p, lambda p2p, peer: _StageStateAverager.get_stub(p2p, peer, namespace=self.averager.prefix),
                                known, shapes, state_bytes, deadline=deadline - (time.monotonic() - started),
                                chunk_timeout=self.config.sender_timeout, on_progress=on_progress, progress_every=progress_every,
                                partial=partial)
            state = asyncio.run_coroutine_threadsafe(fetch, loop).result()
            if state is not None:
                return state
            logger.info("state download try %d found no complete state (%d peers asked, %d bytes kept)", attempt + 1, len(known), partial.received)
            if attempt + 1 < attempts:
                time.sleep(pause)
        return None

    def _sharing_peers(self) -> list[PeerID]:
        """The peers that declared they share the stage's state, the most eager first."""
        found = self.dht.get(f"{self.averager.prefix}.all_averagers", latest=True)
        entries = found.value if found is not None and isinstance(found.value, dict) else {}
        ranked = sorted(((entry.value, random.random(), subkey) for subkey, entry in entries.items()
                         if isinstance(entry.value, (int, float)) and isinstance(subkey, bytes)), reverse=True)
        own = self.averager.peer_id
        return [peer for peer in (PeerID(subkey) for _, _, subkey in ranked) if peer != own]

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
        gather = {"slice": index, "access": self.access.token if self.access else ""}
        try:
            group = self.averager.round_with_group(self.config, min(weight, self.max_weight), gather)
        except TimeoutError:
            return RoundResult(epoch, index, False, 0, "the round did not finish within its deadline")
        if not group:
            return RoundResult(epoch, index, False, 0, "no group formed or all-reduce failed")
        if any(gathered.get("slice") != index for gathered in group.values()):
            return RoundResult(epoch, index, False, len(group), "a peer averaged another slice")
        with self.averager.get_tensors() as buffers:
            averaged = [buffer[: len(values)].clone() for buffer, values in zip(buffers, snapshot)]
        problem = implausible_average(snapshot, averaged, self.config)
        if problem:
            return RoundResult(epoch, index, False, len(group), problem)
        def land() -> None:
            self.partition.apply_delta(self.params, index, snapshot, averaged)
            self.on_update()

        self.on_compute(land).result()
        return RoundResult(epoch, index, True, len(group))

    @staticmethod
    def _may_contribute(snapshot: Sequence[torch.Tensor]) -> bool:
        return all(bool(torch.isfinite(s).all()) for s in snapshot)

    def shutdown(self) -> None:
        self._closed = True
        self.averager.cancel_round_and_shutdown()
