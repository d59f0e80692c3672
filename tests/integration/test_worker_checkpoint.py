"""A worker restarted with the same identity resumes its stage state from its checkpoint."""

import os
import signal
from pathlib import Path

from agora_server.server.checkpoint import load_checkpoint
from agora_server.telemetry import events as ev
from tests.helpers.swarms import run_trainer_to_end, wait_for_worker_step


def test_restarted_worker_resumes_from_its_checkpoint(swarm_harness):
    swarm = swarm_harness.create({"server": {"checkpoint_every": 5}}, steps=120, workers={"body1": 2})
    swarm.start()
    assert wait_for_worker_step(swarm, "body1#1", 10, 240)
    os.kill(swarm.process("body1#1").popen.pid, signal.SIGTERM)  # a clean stop, like Ctrl+C: it checkpoints on the way out
    assert swarm.process("body1#1").popen.wait(60) == 0
    (started,) = swarm.events_of("body1#1", ev.ServerStarted)
    stopped_at = load_checkpoint(Path(swarm.config.server.checkpoint_dir) / swarm.config.run_name / "body1" / f"{started.peer_id}.pt")
    restarted = swarm.start_worker("body1", 1)  # same identity file, so the same checkpoint
    loaded = swarm.wait_for("body1#1", ev.CheckpointLoaded, timeout=120, since=restarted.first_event)
    assert loaded and loaded.stage == "body1"
    assert loaded.epoch == stopped_at["epoch"] >= 10, "the restarted worker must continue from the epoch it stopped at"
    assert run_trainer_to_end(swarm, 600) == 0
