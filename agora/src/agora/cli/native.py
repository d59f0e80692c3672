"""Runs the worker as a child in its own process group, relays its output and explains how it ended.

Ctrl+C and SIGTERM reach only this CLI (the worker has its own session), so they are forwarded to
the worker's group; if it has not exited after the grace period, the group is killed. A stop asked for
with ``agora_cli.py stop`` (from another terminal) is the participant's doing too, and reported as such.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable

from agora.cli import instances
from agora.cli import troubleshooting as known
from agora.cli.worker_command import SCRIPT
from agora.peer_options import WorkerOptions

GRACE_SECONDS = 30.0


class NativeRun:
    def __init__(self, options: WorkerOptions, gpu_id: int, log_file: Path, workdir: Path, repo: Path,
                 grace: float = GRACE_SECONDS, say: Callable[[str], None] = print, run_file: Path | None = None):
        """``run_file``: the run.json the worker's addresses came from, named when one of them fails."""
        self.options, self.gpu_id, self.log_file, self.workdir, self.repo = options, gpu_id, log_file, workdir, repo
        self.run_file = run_file
        self.grace, self.say = grace, say
        self.tail: collections.deque[str] = collections.deque(maxlen=200)
        self.seen: list[known.KnownError] = []
        self._wake = threading.Event()
        self._exited = threading.Event()
        self._signals: list[int] = []
        self.killed_after_grace = False

    def run(self) -> int:
        env = dict(os.environ, **self.options.to_env(), CUDA_VISIBLE_DEVICES=str(self.gpu_id), PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(
            [sys.executable, str(self.repo / SCRIPT), *self.options.to_argv()],
            cwd=self.workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True, text=True, errors="replace",
        )
        self.proc = proc
        instances.record(instances.Instance(self.gpu_id, instances.NATIVE, str(self.log_file), pid=proc.pid, pgid=proc.pid))
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        self.say(f"[SERVER] Started the worker on GPU {self.gpu_id} (pid {proc.pid}). Log: {self.log_file}. Stop with Ctrl+C.")
        relay = threading.Thread(target=self._relay, daemon=True)
        relay.start()
        threading.Thread(target=self._wait_exit, daemon=True).start()
        try:
            self._wake.wait()
            if not self._exited.is_set():  # woken by a signal
                if not self._exited.wait(self.grace):
                    self._kill()
                    self.killed_after_grace = True
                    self._exited.wait()
            relay.join(timeout=5)  # the pipe closes when the group is gone; do not hang on a grandchild
            # still under our handlers: a late Ctrl+C must not turn the explanation into a traceback
            return self.explain(proc.returncode)
        finally:
            if proc.poll() is None:  # e.g. the CLI itself failed: never leave the worker behind
                self._kill()
                proc.wait()
            instances.update(self.gpu_id, exit_code=proc.returncode)  # status says how it ended
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum, frame) -> None:
        self._signals.append(signum)
        if len(self._signals) == 1:
            self.say(f"[SERVER] Stopping the worker (waiting up to {self.grace:.0f}s; press Ctrl+C again to kill it now)...")
            self._send(signum)
        else:
            self._kill()
        self._wake.set()

    def _send(self, signum: int) -> None:
        try:
            os.killpg(self.proc.pid, signum)
        except ProcessLookupError:
            pass

    def _kill(self) -> None:
        self._send(signal.SIGKILL)

    def _wait_exit(self) -> None:
        self.proc.wait()
        self._exited.set()
        self._wake.set()

    def _relay(self) -> None:
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.tail.append(line)
            match = known.match_line(line)
            if match is not None and match not in self.seen:
                self.seen.append(match)
            print(line, flush=True)

    def explain(self, code: int) -> int:
        """Say how the worker ended and what to do; returns the CLI's exit code."""
        record = instances.recorded_for(self.gpu_id)
        stopped_elsewhere = record is not None and record.stop_requested and record.pid == self.proc.pid
        stopped_by_user = bool(self._signals) or stopped_elsewhere
        if self.killed_after_grace:
            self.say(f"[SERVER] The worker did not stop within {self.grace:.0f}s and was killed.")
            return 1
        if stopped_by_user and code in (0, -signal.SIGINT, -signal.SIGTERM, -signal.SIGKILL):
            how = " (asked by agora_cli.py stop)" if stopped_elsewhere and not self._signals else ""
            self.say(f"[SERVER] Worker stopped{how}. Rejoin any time with: python3 agora_cli.py" + (f" --gpu_id {self.gpu_id}" if self.gpu_id else ""))
            return 0
        if code == 0:
            self.say("[SERVER] Worker exited.")
            return 0
        found = list(self.seen)
        if code == -signal.SIGKILL:
            found.append(known.SERVER_KILLED)
            self.say(f"[SERVER] {known.SERVER_KILLED.template}")
        else:
            self.say(f"[SERVER] Server exited with {code}")
        for error in found:
            self.say(f"[SERVER] {error.display}: {error.fix}")
            if error is known.COORDINATOR_UNREACHABLE and self.run_file is not None:
                self.say(f"[SERVER] The address came from auth_server in {self.run_file}.")
        self.say(f"[SERVER] Full log: {self.log_file}")
        return 1
