"""A worker restarted with the same identity resumes its stage state from its checkpoint."""

import os
import signal
from pathlib import Path

from agora_server.server.checkpoint import load_checkpoint
from tests.integration.conftest import run_trainer_to_end, wait_for_worker_step


def event_lines(swarm, log_name: str, event: str) -> list[str]:
    return [line for line in (swarm.log_dir / log_name).read_text().splitlines() if f"agora.events: {event} " in line]


def test_restarted_worker_resumes_from_its_checkpoint(swarm_harness):
    swarm = swarm_harness.create({"server": {"checkpoint_every": 5}}, steps=120, workers={"body1": 2})
    swarm.start()
    assert wait_for_worker_step(swarm, "body1#1", 10, 240)
    os.kill(swarm.process("body1#1").popen.pid, signal.SIGTERM)  # a clean stop, like Ctrl+C: it checkpoints on the way out
    assert swarm.process("body1#1").popen.wait(60) == 0
    (started,) = event_lines(swarm, "server_body1_1.log", "ServerStarted")
    peer_id = started.split("peer_id='")[1].split("'")[0]
    stopped_at = load_checkpoint(Path(swarm.config.server.checkpoint_dir) / swarm.config.run_name / "body1" / f"{peer_id}.pt")
    swarm.start_worker("body1", 1)  # same identity file, so the same checkpoint
    assert swarm.wait_for_output("body1#1", "[SERVER] Resumed stage body1 at training step", 120)
    (loaded,) = event_lines(swarm, "server_body1_1.log", "CheckpointLoaded")
    epoch = int(loaded.split("epoch=")[1].split()[0])
    assert epoch == stopped_at["epoch"] >= 10, "the restarted worker must continue from the epoch it stopped at"
    assert run_trainer_to_end(swarm, 600) == 0
