"""Workers of one stage learn as one model: SPARTA averaging keeps their weights together."""

from pathlib import Path

import torch

from agora_server.server.checkpoint import load_checkpoint
from tests.integration.conftest import run_trainer_to_end

STEPS = 80
AVERAGING = {"fraction": 0.25, "average_every": 3, "matchmaking_time": 1.0, "averaging_timeout": 30.0}


def relative_distance(a: dict, b: dict) -> float:
    diff = sum(float((a[k].float() - b[k].float()).pow(2).sum()) for k in a)
    norm = sum(float(a[k].float().pow(2).sum()) for k in a)
    return (diff / norm) ** 0.5


def train_two_body_workers(swarm_harness, averaging: dict):
    swarm = swarm_harness.create({"server": {"averaging": averaging}}, steps=STEPS, workers={"body1": 2})
    swarm.start()
    assert run_trainer_to_end(swarm, 400) == 0
    assert swarm.stop() == []  # workers write their checkpoints as they stop
    directory = swarm.config.server.checkpoint_dir
    states = [load_checkpoint(path) for path in sorted((Path(directory) / swarm.config.run_name / "body1").glob("*.pt"))]
    assert len(states) == 2, "each body1 worker keeps its own checkpoint"
    return swarm, states


def test_averaging_keeps_workers_of_a_stage_close(swarm_harness):
    averaged_swarm, averaged = train_two_body_workers(swarm_harness, AVERAGING)
    rounds_ok = sum("AveragingRound" in line and "ok=True" in line for line in (averaged_swarm.log_dir / "server_body1_0.log").read_text().splitlines())
    _, independent = train_two_body_workers(swarm_harness, {"enabled": False})

    with_averaging = relative_distance(averaged[0]["model"], averaged[1]["model"])
    without = relative_distance(independent[0]["model"], independent[1]["model"])
    assert rounds_ok >= 5, f"only {rounds_ok} successful averaging rounds"
    assert without > 0, "without averaging two workers fed different micro-batches must differ"
    assert with_averaging < 0.5 * without, f"averaged distance {with_averaging:.4g} vs independent {without:.4g}"
    for state in averaged + independent:
        assert all(torch.isfinite(t).all() for t in state["model"].values())
