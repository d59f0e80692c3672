"""A coordinator process restarted on the same SQLite file and key forgets nothing."""

from __future__ import annotations

import os
import re
import sqlite3
import stat
import subprocess
import sys
import threading
import time

import httpx
import pytest
import yaml

from agora_server.access import verify_access_token

from .test_api import PEER_ID_TAKEN, join, poll, refused
from .test_metrics import scrape

READY = re.compile(r"Uvicorn running on (http://127\.0\.0\.1:\d+)")


class CoordinatorProcess:
    """``python -m agora.run_coordinator`` as a child process; its URL is read from uvicorn's startup line."""

    def __init__(self, config_path, cwd):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agora.run_coordinator", "--config", str(config_path), "--port", "0"],
            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.output: list[str] = []
        found = threading.Event()
        self.url = None

        def read():
            for line in self.proc.stdout:
                self.output.append(line)
                match = READY.search(line)
                if match and not found.is_set():
                    self.url = match.group(1)
                    found.set()
            found.set()  # the process ended: stop waiting

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()
        if not found.wait(60) or self.url is None:
            self.stop()
            raise RuntimeError("coordinator did not start:\n" + "".join(self.output))
        self.http = httpx.Client(base_url=self.url, timeout=30)

    def stop(self) -> int:
        if hasattr(self, "http"):
            self.http.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(10)
        return self.proc.returncode


@pytest.fixture
def processes():
    started: list[CoordinatorProcess] = []
    try:
        yield started
    finally:
        for p in started:
            p.stop()


def test_restart_keeps_bindings_queue_and_contributions(harness, listener, processes, tmp_path):
    config = harness.config(queue={"capacity": 1}).model_dump(mode="json")
    config_path = tmp_path / "coordinator.yaml"
    config_path.write_text(yaml.safe_dump(config))

    first = CoordinatorProcess(config_path, tmp_path)
    processes.append(first)
    active, second_in_line, third_in_line = harness.node("alice"), harness.node("bob"), harness.node("carol")
    access = join(first, active, listener.port).json()
    q2 = join(first, second_in_line, listener.port).json()
    q3 = join(first, third_in_line, listener.port).json()
    assert (access["status"], q2["position"], q3["position"]) == ("access", 1, 2)
    raw, headers = active.signed_heartbeat(access["uid"], time.time(), samples=128, tokens=128 * 256)
    assert first.http.put("/api/heartbeat", content=raw, headers=headers).status_code == 200
    before = first.http.get("/api/contributions").json()
    first.stop()
    # uvicorn re-raises SIGTERM after its shutdown, so the exit code is -15 either way: read the log
    assert "Application shutdown complete" in "".join(first.output), "".join(first.output)
    assert "Bearer" not in "".join(first.output) and harness.tokens["alice"] not in "".join(first.output)

    db_file = tmp_path / "coordinator.db"
    assert stat.S_IMODE(os.stat(db_file).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "coordinator.key").st_mode) == 0o600

    second = CoordinatorProcess(config_path, tmp_path)
    processes.append(second)
    assert second.http.get("/api/contributions").json() == before
    refused(join(second, harness.node("bob", active.identity), listener.port), 403, PEER_ID_TAKEN)
    assert poll(second, third_in_line, q3).json()["position"] == 2
    assert poll(second, second_in_line, q2).json()["position"] == 1
    # the key survived too: tokens issued before the restart still verify, and the node can refresh
    renewed = second.http.put("/api/refresh_token", json={"peer_id": active.peer_id, "uid": access["uid"]},
                              headers=active.auth).json()
    assert renewed["coordinator_public_key"] == access["coordinator_public_key"]
    assert verify_access_token(access["access_token"], renewed["coordinator_public_key"], now=time.time()).uid == access["uid"]


def test_queue_states_are_stored_as_the_words_earlier_coordinators_wrote(harness, listener):
    """The queue's states are an enum in the code and the same plain words in the database (the column's
    type is unchanged), so the database files of earlier coordinators read the same."""
    coord = harness.start(queue={"capacity": 1, "abandon_after_s": 60})
    alice, bob, carol = harness.node("alice"), harness.node("bob"), harness.node("carol")
    assert join(coord, alice, listener.port).json()["status"] == "access"
    bob_q, carol_q = join(coord, bob, listener.port).json(), join(coord, carol, listener.port).json()
    harness.clock.advance(40)
    assert poll(coord, bob, bob_q).json()["position"] == 1
    harness.clock.advance(40)  # carol has not polled for 80 s: dropped
    assert poll(coord, bob, bob_q).json()["position"] == 1
    with sqlite3.connect(harness.tmp_path / "coordinator.db") as db:
        stored = db.execute("SELECT status, drop_reason FROM queue_requests ORDER BY seq").fetchall()
    assert stored == [("admitted", None), ("waiting", None), ("dropped", "abandoned")]

    harness.stop_all()
    again = harness.start(queue={"capacity": 1, "abandon_after_s": 60})
    assert poll(again, bob, bob_q).json()["position"] == 1
    assert poll(again, carol, carol_q).json()["error"] == "abandoned"
    metrics = scrape(again)
    assert metrics[("agora_coordinator_queue_drops_total", (("reason", "abandoned"),))] == 1
    assert metrics[("agora_coordinator_admissions_total", (("stage", "head"),))] == 1
