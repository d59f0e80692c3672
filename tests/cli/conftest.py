"""Fixtures for the participant CLI tests: a temporary HOME and working directory per test, a run.json
pointing at local-tiny (the CPU run), real sockets for ports, and cleanup of every worker started."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import sys
from pathlib import Path

import pexpect
import pytest

from agora import ports

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    return ports.free_port("0.0.0.0")


class Participant:
    """The CLI as a participant runs it, in a real pseudo-terminal."""

    def __init__(self, home: Path, workdir: Path, run_json: Path):
        self.home, self.workdir, self.run_json = home, workdir, run_json
        self.children: list[pexpect.spawn] = []

    def env(self) -> dict[str, str]:
        env = dict(os.environ, HOME=str(self.home), TERM="xterm", PYTHONUNBUFFERED="1")
        env.pop("AGORA_TOKEN", None)
        return env

    def spawn(self, *args: str, timeout: float = 90) -> pexpect.spawn:
        child = pexpect.spawn(
            sys.executable, [str(REPO / "agora_cli.py"), "--run_json", str(self.run_json), *args],
            cwd=str(self.workdir), env=self.env(), encoding="utf-8", timeout=timeout, dimensions=(50, 220),
        )
        child.logfile_read = io.StringIO()  # the whole transcript, to check the token never shows
        self.children.append(child)
        return child

    @staticmethod
    def transcript(child: pexpect.spawn) -> str:
        return child.logfile_read.getvalue()

    def settings(self, gpu_id: int = 0) -> dict:
        return json.loads((self.home / ".agora" / f"settings_gpu{gpu_id}.json").read_text())

    def instance(self, gpu_id: int = 0) -> dict:
        return json.loads((self.home / ".agora" / f"instance_gpu{gpu_id}.json").read_text())

    def cleanup(self) -> None:
        # workers live in their own process groups: kill them by the recorded group, then the CLIs
        for path in (self.home / ".agora").glob("instance_gpu*.json"):
            try:
                os.killpg(json.loads(path.read_text())["pgid"], signal.SIGKILL)
            except (OSError, ValueError, KeyError, TypeError):
                pass
        for child in self.children:
            child.close(force=True)


@pytest.fixture
def silent_coordinator():
    """A TCP listener that accepts and never answers: a worker joining it waits until it is stopped."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()


def write_run_json(path: Path, auth_server: str) -> Path:
    path.write_text(json.dumps({"run_config": "local-tiny", "auth_server": auth_server, "seeds": []}))
    return path


@pytest.fixture
def participant(tmp_path):
    home, workdir = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    workdir.mkdir()
    # a port nothing listens on: the worker's join fails at once with a connection error
    run_json = write_run_json(tmp_path / "run.json", f"http://127.0.0.1:{free_port()}")
    p = Participant(home, workdir, run_json)
    yield p
    p.cleanup()
