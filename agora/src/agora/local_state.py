"""What one local swarm run leaves in its log directory, and making sure the next run starts clean.

A run records its launcher and children in ``swarm.json`` as it starts them. The next run reads that
record: if the launcher still runs, it refuses (two swarms would share the directory); otherwise it
stops whatever that run left behind (its launcher was killed, e.g. SIGKILL or a crash) and deletes the
previous run's state (coordinator database, checkpoints, logs, summary), so nothing of one run — the
coordinator's idea of who is active above all — leaks into the next.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import time
from pathlib import Path

import psutil

RECORD = "swarm.json"
# everything a local swarm writes into its log directory; other files there (a benchmark's run.yaml,
# its console log) are not the swarm's to delete
STATE_FILES = ("coordinator.db*", "trainer-summary.json", "dashboard.html", "seed.log*", "trainer.log*",
               "server_*.log*", "server_*.status.json", "run-config.yaml", RECORD)
STATE_DIRS = ("coordinator-checkpoints", "checkpoints")


class SwarmBusy(RuntimeError):
    """Another local swarm runs from this log directory right now."""


@dataclasses.dataclass(frozen=True)
class RecordedProcess:
    name: str
    pid: int
    started: float
    """psutil's create_time: with the pid, tells this process from a later one that reuses its pid."""

    def alive(self) -> bool:
        try:
            proc = psutil.Process(self.pid)
            return abs(proc.create_time() - self.started) < 0.05 and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False


def describe(pid: int, name: str) -> RecordedProcess:
    return RecordedProcess(name, pid, psutil.Process(pid).create_time())


def group_members(pgid: int) -> list[psutil.Process]:
    """Live (non-zombie) processes of a process group."""
    members = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


def stop_groups(pgids: list[int], grace: float) -> None:
    """SIGTERM to each process group, SIGKILL to what is left after ``grace`` seconds."""
    for pgid in pgids:
        signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(group_members(p) for p in pgids) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pgid in pgids:
        if group_members(pgid):
            signal_group(pgid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while any(group_members(p) for p in pgids) and time.monotonic() < deadline:
        time.sleep(0.1)


def signal_group(pgid: int, sig: int) -> None:
    """Signal a process group; one that is gone (or not ours) is left alone."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class RunState:
    """The log directory of one local swarm: claimed at start, recorded as children start, released at stop."""

    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self.path = self.log_dir / RECORD
        self.launcher = describe(os.getpid(), "launcher")
        self.children: list[RecordedProcess] = []

    def claim(self, grace: float = 10.0) -> list[str]:
        """Take the directory for this run: stop the leftovers of a run whose launcher is gone, delete
        the previous run's state. Returns the names of the leftover processes stopped; SwarmBusy if the
        previous run's launcher is still running."""
        previous = self._read()
        stopped: list[str] = []
        if previous is not None:
            launcher, children = previous
            if launcher.alive() and launcher.pid != os.getpid():
                since = time.strftime("%H:%M:%S", time.localtime(launcher.started))
                raise SwarmBusy(f"another local swarm runs from {self.log_dir} (pid {launcher.pid}, started {since});"
                                f" stop it first (Ctrl+C in its terminal, or `kill {launcher.pid}`)")
            left = [child for child in children if child.alive()]
            if left:
                stop_groups([child.pid for child in left], grace)  # each child leads its own group
                stopped = [child.name for child in left]
        self._clear()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._write()
        return stopped

    def add(self, name: str, pid: int) -> None:
        try:
            self.children.append(describe(pid, name))
        except psutil.Error:
            return  # already gone: nothing to clean up later
        self._write()

    def release(self) -> None:
        """Every child has been stopped: nothing for the next run to clean up."""
        self.path.unlink(missing_ok=True)

    def _clear(self) -> None:
        for pattern in STATE_FILES:
            for path in self.log_dir.glob(pattern):
                path.unlink(missing_ok=True)
        for name in STATE_DIRS:
            shutil.rmtree(self.log_dir / name, ignore_errors=True)

    def _read(self) -> tuple[RecordedProcess, list[RecordedProcess]] | None:
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
            return RecordedProcess(**raw["launcher"]), [RecordedProcess(**c) for c in raw["children"]]
        except (OSError, ValueError, KeyError, TypeError):
            return None  # none, or half-written by a run killed mid-write: nothing trustworthy to stop

    def _write(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        data = {"launcher": dataclasses.asdict(self.launcher), "children": [dataclasses.asdict(c) for c in self.children]}
        tmp.write_text(json.dumps(data), encoding="utf-8")
        os.replace(tmp, self.path)
