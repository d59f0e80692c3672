"""Workers of one stage learn as one model: SPARTA averaging keeps their weights together."""

import json
import signal
from pathlib import Path

import torch

from agora_server.server.checkpoint import load_checkpoint
from agora_server.telemetry import events as ev
from tests.helpers.swarms import run_trainer_to_end, trainer_step, wait_for_trainer_step

STEPS = 120
# epochs of 6 micro-batches (a few seconds here) and a round every 3 epochs: a round that finds no
# partner gives up (2 × matchmaking + request timeout = 5 s) before the next window opens, so one
# missed round cannot push the two workers' rounds out of phase for good, even on a loaded CPU
SERVER = {"target_batch_size": 24}
AVERAGING = {"fraction": 0.5, "average_every": 3, "matchmaking_time": 2.0, "request_timeout": 1.0, "averaging_timeout": 30.0}


def relative_distance(a: dict, b: dict) -> float:
    diff = sum(float((a[k].float() - b[k].float()).pow(2).sum()) for k in a)
    norm = sum(float(a[k].float().pow(2).sum()) for k in a)
    return (diff / norm) ** 0.5


def train_two_body_workers(swarm_harness, averaging: dict):
    swarm = swarm_harness.create({"server": {**SERVER, "averaging": averaging}}, steps=STEPS, workers={"body1": 2})
    swarm.start()
    assert run_trainer_to_end(swarm, 400) == 0
    assert swarm.stop() == []  # workers write their checkpoints as they stop
    directory = swarm.config.server.checkpoint_dir
    states = [load_checkpoint(path) for path in sorted((Path(directory) / swarm.config.run_name / "body1").glob("*.pt"))]
    assert len(states) == 2, "each body1 worker keeps its own checkpoint"
    return swarm, states


def test_averaging_keeps_workers_of_a_stage_close(swarm_harness):
    averaged_swarm, averaged = train_two_body_workers(swarm_harness, AVERAGING)
    rounds_ok = sum(r.ok for r in averaged_swarm.events_of("body1#0", ev.AveragingRound))
    _, independent = train_two_body_workers(swarm_harness, {"enabled": False})

    with_averaging = relative_distance(averaged[0]["model"], averaged[1]["model"])
    without = relative_distance(independent[0]["model"], independent[1]["model"])
    assert rounds_ok >= 3, f"only {rounds_ok} successful averaging rounds"
    assert without > 0, "without averaging two workers fed different micro-batches must differ"
    assert with_averaging < 0.5 * without, f"averaged distance {with_averaging:.4g} vs independent {without:.4g}"
    for state in averaged + independent:
        assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_a_swarm_on_the_production_policy_trains_and_averages_its_offloaded_masters(swarm_harness):
    """llama-8b's policy on the tiny model: bfloat16 weights and wire, float32 masters and AdamW state
    on the CPU, checkpointed layers, chunked loss, subspace boundaries; two workers of body1 average."""
    production = {
        "boundary": {"codec": "subspace", "compression_rate": 16, "wire_dtype": "bfloat16"},
        "server": {**SERVER, "averaging": AVERAGING, "precision": {
            "dtype": "bfloat16", "master_weights": "cpu", "activation_checkpointing": True, "loss_chunk_tokens": 192,
        }},
    }
    swarm = swarm_harness.create(production, steps=STEPS, workers={"body1": 2})
    swarm.start()
    assert run_trainer_to_end(swarm, 400) == 0
    summary = json.loads(swarm.summary_path.read_text())
    assert summary["completed"] == STEPS, summary
    losses = [loss for _, loss in summary["losses"]]
    assert sum(losses[:10]) / 10 - sum(losses[-10:]) / 10 > 1.0, "the loss fell"
    rounds = swarm.events_of("body1#0", ev.AveragingRound)
    assert sum(r.ok for r in rounds) >= 2, rounds
    assert swarm.stop() == []
    directory = Path(swarm.config.server.checkpoint_dir) / swarm.config.run_name / "body1"
    states = [load_checkpoint(path) for path in sorted(directory.glob("*.pt"))]
    for state in states:
        assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in state["model"].values()), "float32 masters"
    assert relative_distance(states[0]["model"], states[1]["model"]) < 0.1


def test_newcomer_catches_up_before_it_is_routed_to_and_ends_close(swarm_harness):
    # the trainer runs until stopped: with a fixed count it could finish before the newcomer is ready
    swarm = swarm_harness.create({"server": {**SERVER, "averaging": AVERAGING}}, steps=10**6, workers={"body1": 2})
    swarm.start()
    assert wait_for_trainer_step(swarm, 20, 240)

    swarm.start_worker("body1", 2)
    assert swarm.wait_for("body1#2", ev.WarmupStarted, timeout=120)
    assert swarm.wait_for("body1#2", ev.StateDownloaded, lambda e: e.ok, timeout=120), "the newcomer loaded the stage's weights from a peer"
    complete = swarm.wait_for("body1#2", ev.WarmupComplete, timeout=180)
    assert complete and complete.requests_served == 0, f"the trainer routed to a catching-up worker: {complete}"
    assert not complete.timed_out
    assert swarm.wait_for("body1#2", ev.OptimizerStepped, timeout=120)

    assert wait_for_trainer_step(swarm, trainer_step(swarm) + 60, 300), "training with the newcomer went on"
    trainer = swarm.process("trainer").popen
    trainer.send_signal(signal.SIGTERM)  # it drains what is in flight and exits cleanly
    assert trainer.wait(120) == 0
    assert swarm.stop() == []
    directory = Path(swarm.config.server.checkpoint_dir) / swarm.config.run_name / "body1"
    states = [load_checkpoint(path) for path in sorted(directory.glob("*.pt"))]
    assert len(states) == 3
    distances = [relative_distance(a["model"], b["model"]) for i, a in enumerate(states) for b in states[i + 1 :]]
    assert max(distances) < 0.15, f"pairwise distances {distances}"


def test_workers_averaging_gradients_take_the_same_steps(swarm_harness):
    """With gradient averaging the two workers of body1 step on the mean of both their gradients every
    epoch: from the same initial weights they stay together, far closer than SPARTA alone keeps them."""
    averaging = {**AVERAGING, "enabled": True, "gradient_epochs": 10**6, "target_group_size": 2}
    swarm, states = train_two_body_workers(swarm_harness, averaging)
    rounds = [r for name in ("body1#0", "body1#1") for r in swarm.events_of(name, ev.GradientsAveraged)]
    ok = sum(r.ok for r in rounds)
    steps = [state["counters"]["optimizer_steps"] for state in states]
    assert ok >= 0.8 * sum(steps), f"{ok} averaged of {sum(steps)} steps: {rounds[:5]}"
    assert relative_distance(states[0]["model"], states[1]["model"]) < 1e-3
