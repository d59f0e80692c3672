"""Console lines a participant sees, with the reference guide's tags."""

from __future__ import annotations

import sys
import threading
from functools import singledispatch
from typing import Callable, TextIO

from agora_server.telemetry import events as ev


@singledispatch
def console_lines(event: ev.Event) -> list[str]:
    """Events with no console form are only written to the file log."""
    return []


@console_lines.register
def _(event: ev.ServerStarted) -> list[str]:
    return [f"[SERVER] Serving stage {event.stage} as {event.peer_id}", "[SERVER] Training started"]


@console_lines.register
def _(event: ev.SeedListening) -> list[str]:
    return [f"[SEED] Reachable at {maddr}" for maddr in event.maddrs]


@console_lines.register
def _(event: ev.MemoryPlanned) -> list[str]:
    gib = 2**30
    recompute = "checkpointed (recomputed in the backward)" if event.checkpointing else "kept for the backward"
    lines = [
        f"[SERVER] Memory plan for stage {event.stage}: {event.peak_bytes / gib:.1f} GiB of this GPU's {event.vram_bytes / gib:.1f} GiB "
        f"at micro-batch {event.batch} x {event.seq_len} tokens, activations {recompute}; {event.host_bytes / gib:.0f} GiB of host memory"
    ]
    if event.max_batch < event.batch:
        lines.append(
            f"[SERVER] This GPU fits micro-batches of at most {event.max_batch} on this stage: larger requests will run out of memory "
            f"(restart with --batch_size_override {max(event.max_batch, 1)})"
        )
    return lines


@console_lines.register
def _(event: ev.ComputeFailed) -> list[str]:
    # the guide's "CUDA out of memory" reaches the console, where the launcher explains the fix
    return [f"[SERVER] {event.error}"] if event.out_of_memory else []


@console_lines.register
def _(event: ev.OptimizerStepped) -> list[str]:
    return [f"[TRAINING] Training step {event.step}"]


@console_lines.register
def _(event: ev.NonFiniteGradients) -> list[str]:
    return [f"[TRAINING] Skipped a step: gradient norm is {event.grad_norm}"]


@console_lines.register
def _(event: ev.WarmupStarted) -> list[str]:
    return ["[WARMUP] Node warmup started, catching up with other nodes"]


@console_lines.register
def _(event: ev.StateDownloaded) -> list[str]:
    if event.ok:
        return [f"[WARMUP] Loaded the stage's weights from a peer at training step {event.epoch}"]
    return ["[WARMUP] No peer shared its weights yet; catching up through averaging alone"]


@console_lines.register
def _(event: ev.WarmupComplete) -> list[str]:
    suffix = " (no averaging partner answered; joining anyway)" if event.timed_out else ""
    return [f"[WARMUP] Node warmup complete{suffix}"]


@console_lines.register
def _(event: ev.CheckpointLoaded) -> list[str]:
    skipped = [f"[SERVER] Could not read checkpoint {u}; resuming from the previous one (the next checkpoint replaces the unreadable file)"
               for u in event.unreadable]
    return [*skipped, f"[SERVER] Resumed stage {event.stage} at training step {event.epoch} from {event.path}"]


@console_lines.register
def _(event: ev.CheckpointFailed) -> list[str]:
    return [f"[SERVER] Checkpoint not saved: {event.reason}"]


@console_lines.register
def _(event: ev.CheckpointSkipped) -> list[str]:
    return [f"[SERVER] Checkpoint at step {event.epoch} skipped: the previous one is still being written (the disk is slower "
            f"than checkpoint_every steps); the next is tried at step {event.next_try}"]


@console_lines.register
def _(event: ev.AveragingRound) -> list[str]:
    if event.ok:
        return [f"[TRAINING] Averaged weight slice {event.slice_index} with {event.group_size - 1} peer(s)"]
    return [f"[TRAINING] Averaging round at step {event.epoch} failed: {event.reason}"]


@console_lines.register
def _(event: ev.GradientsAveraged) -> list[str]:
    # one round per epoch: only the ones that left this worker stepping alone are worth a line
    return [] if event.ok else [f"[TRAINING] Gradient averaging at step {event.epoch} failed: {event.reason}; stepped on this worker's own gradient"]


@console_lines.register
def _(event: ev.ProgressReport) -> list[str]:
    total = event.forward_batches + event.backward_batches
    return [
        f"[PROGRESS] Processed {total} batches in the last {event.window_seconds:.0f}s",
        f"[PROGRESS] Forward pass: {event.forward_batches} batches",
        f"[PROGRESS] Backward pass: {event.backward_batches} batches",
        f"[PROGRESS] Your contribution: {event.contribution_samples} samples",
    ]


def format_wait(seconds: float | None, joins_paused: bool = False) -> str:
    if joins_paused:
        return "unknown (joins are paused)"
    if seconds is None:
        return "unknown (no place has freed up yet to measure it)"
    minutes = max(1, round(seconds / 60))
    return f"{minutes // 60}h {minutes % 60}m" if minutes >= 60 else f"{minutes}m"


@console_lines.register
def _(event: ev.JoiningRun) -> list[str]:
    return [f"[AUTH] Joining the run through the coordinator at {event.coordinator}"]


@console_lines.register
def _(event: ev.AuthQueued) -> list[str]:
    wait = format_wait(event.estimated_wait_seconds, event.joins_paused)
    return [f"[AUTH] Authorization queue: position {event.position}, estimated wait: {wait}"]


@console_lines.register
def _(event: ev.AccessGranted) -> list[str]:
    lines = [f"[AUTH] Access granted for {event.username}"]
    if event.dashboard_url:
        lines.append(f"[AUTH] This node on the run's dashboard: {event.dashboard_url}")
    return lines


@console_lines.register
def _(event: ev.ProcessError) -> list[str]:
    return [f"[{event.tag}] {event.message}"]


@console_lines.register
def _(event: ev.StateDownloadProgress) -> list[str]:
    if event.resumed_at and event.seconds == 0:
        return [f"[DOWNLOAD] Connection back: continuing the stage weights at {100 * event.bytes_done / event.bytes_total:.0f}% "
                f"({event.bytes_done / 2**20:,.1f} of {event.bytes_total / 2**20:,.1f} MiB already here)"]
    rate = (event.bytes_done - event.resumed_at) / max(event.seconds, 1e-6)
    left = (event.bytes_total - event.bytes_done) / max(rate, 1.0)
    return [f"[DOWNLOAD] Stage weights from a peer: {100 * event.bytes_done / event.bytes_total:.0f}% "
            f"({event.bytes_done / 2**20:,.1f} of {event.bytes_total / 2**20:,.1f} MiB), {rate / 1e6:.1f} MB/s, {_duration(left)} left"]


@console_lines.register
def _(event: ev.DownloadProgress) -> list[str]:
    if event.bytes_done == 0:
        return ["[DOWNLOAD] Downloading model weights..."]
    mib = event.bytes_done / 2**20
    if not event.bytes_total:
        return [f"[DOWNLOAD] {mib:.1f} MiB"]
    line = f"[DOWNLOAD] {100 * event.bytes_done / event.bytes_total:.0f}% ({mib:,.1f} of {event.bytes_total / 2**20:,.1f} MiB)"
    if event.bytes_per_second:
        left = (event.bytes_total - event.bytes_done) / event.bytes_per_second
        line += f", {event.bytes_per_second / 1e6:.1f} MB/s, {_duration(left)} left"
    return [line]


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


@console_lines.register
def _(event: ev.DownloadComplete) -> list[str]:
    return ["[DOWNLOAD] Model weights downloaded. Waiting for authorization..."]


@console_lines.register
def _(event: ev.CheckpointUploaded) -> list[str]:
    return [] if event.ok else [f"[SERVER] Could not upload the stage checkpoint to the coordinator: {event.detail}"]


@console_lines.register
def _(event: ev.CheckpointUploadProgress) -> list[str]:
    rate = (event.sent_bytes - event.resumed_at) / max(event.seconds, 1e-6)
    eta = (event.total_bytes - event.sent_bytes) / max(rate, 1.0)
    return [f"[SERVER] Uploading the epoch {event.epoch} checkpoint to the coordinator: {event.sent_bytes / event.total_bytes:.0%} of "
            f"{event.total_bytes / 1e6:,.0f} MB, {rate / 1e6:.1f} MB/s, {eta:.0f}s left"]


@console_lines.register
def _(event: ev.CoordinatorUnreachable) -> list[str]:
    line = f"[AUTH] Could not reach the coordinator to {event.action} ({event.error}); retrying in {event.retry_in:.0f}s"
    if event.expires_in is not None:
        line += f"; this node stops in {event.expires_in:.0f}s, when its access expires, unless the coordinator answers"
    return [line]


@console_lines.register
def _(event: ev.HealthStop) -> list[str]:
    return [f"[SERVER] {event.message}", f"[SERVER] Reason: {event.detail}"]


@console_lines.register
def _(event: ev.ServerStopping) -> list[str]:
    return [f"[SERVER] Stopping: {event.reason}"]


@console_lines.register
def _(event: ev.WaitingForStages) -> list[str]:
    return [f"[TRAINER] Waiting for workers of stage(s): {', '.join(event.stages)}"]


@console_lines.register
def _(event: ev.TrainerPaused) -> list[str]:
    return [
        f"[TRAINER] Paused: no worker serves stage(s) {', '.join(event.stages)} right now; no new micro-batches"
        f" until one joins. {event.in_flight} in flight wait up to {event.wait_limit:.0f}s for it, then count as dropped."
    ]


@console_lines.register
def _(event: ev.TrainerResumed) -> list[str]:
    return [f"[TRAINER] Resumed after {event.paused_seconds:.0f}s: every stage has a worker again"]


@console_lines.register
def _(event: ev.WorkerBanned) -> list[str]:
    return [f"[TRAINER] Worker {event.peer_id[:12]}… of {event.stage} failed ({event.reason}); avoiding it for {event.seconds:.0f}s"]


@console_lines.register
def _(event: ev.TrainingStarted) -> list[str]:
    goal = f"{event.total_steps} micro-batches" if event.total_steps else "until stopped"
    return [f"[TRAINER] Every stage has a worker ({', '.join(event.stages)}); training {goal}, {event.in_flight} in flight"]


@console_lines.register
def _(event: ev.DataShardChosen) -> list[str]:
    source = "assigned by the coordinator to this trainer's key" if event.by_coordinator else "--rank"
    return [f"[TRAINER] Reading data shard {event.rank} of {event.shards} ({source})"]


@console_lines.register
def _(event: ev.DataResumed) -> list[str]:
    return [f"[TRAINER] Continuing the data stream from micro-batch {event.next_index} ({event.finished} already trained, saved in {event.path})"]


@console_lines.register
def _(event: ev.DataPositionDiscarded) -> list[str]:
    return [f"[TRAINER] Saved data position not used: {event.reason}"]


@console_lines.register
def _(event: ev.DataPositionNotSaved) -> list[str]:
    return [f"[TRAINER] Could not save the data position to {event.path} ({event.error}); training goes on, "
            "but a restart would repeat what it trains until the position can be saved again"]


@console_lines.register
def _(event: ev.DataSourceFailed) -> list[str]:
    return [f"[TRAINER] Reading the training data failed ({event.error}); retrying in {event.retry_in:.0f}s "
            f"(failure {event.failures} in a row), continuing at micro-batch {event.next_index}"]


@console_lines.register
def _(event: ev.ValidationMeasured) -> list[str]:
    return [f"[TRAINER] validation loss {event.loss:.3f} after {event.step} micro-batches ({event.batches} held-out batches, {event.seconds:.1f}s)"]


def _loss(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


@console_lines.register
def _(event: ev.TrainerReport) -> list[str]:
    # "micro-batches", not "step": a worker's [TRAINING] step is an optimizer step of its stage
    done = f"{event.step}/{event.total_steps}" if event.total_steps else str(event.step)
    smoothed = event.smoothed_loss if event.smoothed_loss is not None else event.loss
    parts = [f"[TRAINER] micro-batches {done}", f"loss {_loss(smoothed)}"]
    if event.validation_loss is not None:
        parts.append(f"validation {_loss(event.validation_loss)} (at {event.validation_step})")
    parts.append(f"{event.tokens_per_second:,.0f} tokens/s")
    if event.stages_total:
        parts.append(f"stages served {event.stages_served}/{event.stages_total} ({event.workers} workers)")
    drops = f"dropped {event.dropped}"
    if event.retried:
        drops += f", retried {event.retried}"
    if event.cancelled:
        drops += f", cancelled {event.cancelled}"
    parts.append(drops)
    return [" | ".join(parts)]


def _arrow(first: float | None, last: float | None) -> str:
    if first is None or last is None:
        return _loss(last)
    return f"{first:.3f} → {last:.3f}"


@console_lines.register
def _(event: ev.TrainerFinished) -> list[str]:
    dropped = ", ".join(f"{reason}: {count}" for reason, count in sorted(event.dropped.items())) or "none"
    verb = "Stopped" if event.stopped else "Finished"
    line = (f"[TRAINER] {verb}: {event.completed} micro-batches completed of {event.sent} sent;"
            f" dropped: {dropped}; retried: {event.retried}; loss {_arrow(event.first_loss, event.final_loss)}")
    if event.validation_last is not None:
        line += f"; validation {_arrow(event.validation_first, event.validation_last)}"
    if event.cancelled:
        line += f"; cancelled by the stop: {event.cancelled}"
    if event.kept_graph_backwards or event.recomputed_backwards:
        line += (f"; backwards on kept graphs: {event.kept_graph_backwards}, recomputed: {event.recomputed_backwards}"
                 f" ({event.graph_resends} sent again with their inputs)")
    return [line]


class ConsolePrinter:
    """EventBus subscriber that writes each event's lines, whole, one writer at a time: its console
    lines by default, or what ``render`` makes of it (e.g. one JSON line for a launcher)."""

    def __init__(self, stream: TextIO | None = None, render: Callable[[ev.Event], list[str]] = console_lines):
        self.stream = stream or sys.stdout
        self.render = render
        self._lock = threading.Lock()

    def __call__(self, event: ev.Event) -> None:
        lines = self.render(event)
        if not lines:
            return
        with self._lock:
            self.stream.write("".join(line + "\n" for line in lines))
            self.stream.flush()
