"""What the local swarm prints: every child's lines with ``--verbose``, otherwise a quiet view built
from the children's events — one line per worker as it starts, the trainer's periodic line, anything
that needs attention — ending with one line that says how the run went.

The file logs in ``logs/local/`` keep everything either way.
"""

from __future__ import annotations

import sys
import threading
from typing import TextIO

from agora_server.telemetry import events as ev

# events worth a line in the quiet view; the rest stay in the file logs (and in --verbose)
_QUIET = (
    ev.AccessGranted, ev.AuthQueued, ev.ServerStarted, ev.WarmupStarted, ev.WarmupComplete, ev.HealthStop,
    ev.ProcessError, ev.CheckpointFailed, ev.CheckpointSkipped, ev.TrainingStarted, ev.TrainerReport, ev.TrainerPaused,
    ev.TrainerResumed, ev.WorkerBanned, ev.DataResumed, ev.DataPositionDiscarded, ev.DataPositionNotSaved, ev.DataSourceFailed,
)


class SwarmConsole:
    def __init__(self, output: TextIO | None = None, verbose: bool = True):
        self.output = output or sys.stdout
        self.verbose = verbose
        self._lock = threading.Lock()
        self._queued_at: dict[str, int] = {}  # the queue position last shown per child

    def say(self, line: str) -> None:
        """A line of the swarm's own (``[LOCAL] …``), shown in both views."""
        with self._lock:
            self.output.write(line + "\n")
            self.output.flush()

    def child_text(self, name: str, text: str) -> None:
        """A line a child printed that is not an event (a library's warning, a traceback)."""
        if self.verbose:
            self.say(f"{name:<10}| {text}")

    def child_exited(self, name: str, code: int, last_text: list[str]) -> None:
        """A child ended with a failure code; in the quiet view its last plain lines (a traceback) come along."""
        self.say(f"[LOCAL] {name} exited with code {code}" + ("; its last lines:" if last_text and not self.verbose else ""))
        if not self.verbose:
            for text in last_text:
                self.say(f"{name:<10}| {text}")

    def child_event(self, name: str, event: ev.Event, lines: list[str]) -> None:
        if self.verbose:
            for line in lines:
                self.say(f"{name:<10}| {line}")
            return
        if not isinstance(event, _QUIET):
            return
        if isinstance(event, ev.AuthQueued):  # polled every few seconds: show only a new place in line
            if self._queued_at.get(name) == event.position:
                return
            self._queued_at[name] = event.position
        if isinstance(event, ev.AccessGranted):
            return  # the start line that follows says it all
        if isinstance(event, ev.ServerStarted):
            lines = [f"[SERVER] Training started on stage {event.stage} (peer {event.peer_id[:8]}…{event.peer_id[-6:]})"]
        for line in lines:
            self.say(f"{name:<10}| {line}")


def outcome_line(finished: ev.TrainerFinished | None, *, trainer_code: int | None, stopped_by_user: bool,
                 log_dir: str, summary: str | None, dashboard: str | None, trainer_error: str | None = None) -> str:
    """The last line of a local run: what was trained, how the loss moved, what went wrong, where to look."""
    where = [f"logs: {log_dir}"]
    if summary:
        where.append(f"summary: {summary}")
    if dashboard:
        where.append(f"dashboard: {dashboard}")
    places = "; ".join(where)
    if finished is None:
        if stopped_by_user:
            return f"[LOCAL] Stopped by you before training began. {_sentence(places)}."
        why = f": {trainer_error}" if trainer_error else ""
        return f"[LOCAL] The trainer failed (exit code {trainer_code}){why}. {_sentence(places)}."
    parts = [f"{finished.completed} micro-batches in {finished.seconds:.0f}s"]
    if finished.seconds > 0 and finished.tokens:
        parts[0] += f" ({finished.tokens / finished.seconds:,.0f} tokens/s)"
    if finished.first_loss is not None and finished.final_loss is not None:
        parts.append(f"loss {finished.first_loss:.2f} → {finished.final_loss:.2f}")
    if finished.validation_first is not None and finished.validation_last is not None:
        parts.append(f"validation {finished.validation_first:.2f} → {finished.validation_last:.2f}")
    failed = sum(finished.dropped.values())
    parts.append(f"{failed} dropped" if failed else "none dropped")
    if finished.cancelled:
        parts.append(f"{finished.cancelled} in flight cancelled by the stop")
    head = "Stopped by you after" if stopped_by_user or finished.stopped else "Done:"
    return f"[LOCAL] {head} {', '.join(parts)}. {_sentence(places)}."


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]
