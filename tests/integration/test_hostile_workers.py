"""Dishonest workers in a live local swarm: the trainer judges them by what they do, not by what
they announce."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from agora_server.telemetry import events as ev
from tests.helpers.swarms import run_trainer_to_end, wait_for_trainer_step

ROOT = Path(__file__).resolve().parents[2]


def test_a_worker_that_refuses_every_call_is_banned_and_training_goes_on(swarm_harness):
    swarm = swarm_harness.create(steps=60)
    swarm.start()
    assert wait_for_trainer_step(swarm, 5, 180), "the swarm never trained"
    refuser = subprocess.Popen(
        [sys.executable, "-m", "tests.helpers.refusing_worker", "--run", swarm.config.run_name, "--stage", "body1",
         "--initial_peers", *swarm.seed_maddrs],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=os.environ.copy())
    try:
        ready = json.loads(refuser.stdout.readline())
        assert ready["event"] == "refusing_worker_ready", ready
        banned = swarm.wait_for("trainer", ev.WorkerBanned, lambda e: e.peer_id == ready["peer_id"], timeout=120)
        assert banned is not None, "the trainer never tried (or never banned) the worker that claims 1e9 tokens/s"
        assert banned.reason.startswith("refused"), banned.reason
        assert run_trainer_to_end(swarm, 400) == 0
    finally:
        refuser.terminate()
        refuser.wait(30)
    [finished] = swarm.events_of("trainer", ev.TrainerFinished)
    assert finished.completed == 60, finished
    assert not any(reason.startswith("refused") for reason in finished.dropped), \
        f"micro-batches the refusing worker drew were dropped instead of retried elsewhere: {finished.dropped}"
    refusals = [json.loads(line) for line in refuser.stdout.read().splitlines() if line.startswith("{")]
    # banned with a growing backoff: a handful of calls, not a share of every micro-batch
    assert len(refusals) <= 10, len(refusals)
