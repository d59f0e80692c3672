"""A real swarm on loopback: seed, workers and trainer as separate processes over hivemind."""

import json
import signal

from agora.local_console import outcome_line
from agora_server.telemetry import events as ev
from tests.helpers.swarms import ports_in_use, run_trainer_to_end, wait_for_trainer_step

STEPS = 60
LOSS_DROP = 1.0  # nats between the mean of the first and last 10 micro-batches; we measure ~2.3


def test_swarm_trains_and_leaves_nothing_behind(swarm_harness):
    swarm = swarm_harness.create(steps=STEPS)
    swarm.start()
    for stage in ("head", "body1", "tail"):
        assert swarm.wait_for(f"{stage}#0", ev.ServerStarted, timeout=120)
    assert swarm.wait_for("head#0", ev.OptimizerStepped, lambda e: e.step == 1, timeout=120)
    ports = swarm.listening_ports()
    assert len(ports) >= 4, "seed and each worker listen on a TCP port"
    assert swarm.wait_for("body1#0", ev.ProgressReport, timeout=120)

    assert run_trainer_to_end(swarm, 300) == 0
    summary = json.loads(swarm.summary_path.read_text())
    assert summary["completed"] == STEPS
    assert summary["sent"] == summary["completed"] + sum(summary["dropped"].values())
    losses = [loss for _, loss in summary["losses"]]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert first - last > LOSS_DROP, f"loss went from {first:.3f} to {last:.3f}"
    # head and body1 each run one backward per micro-batch: on the graph their forward kept, unless the
    # stage stepped in between (then the worker answers "graph gone" and the inputs are sent again)
    backwards = summary["kept_graph_backwards"] + summary["recomputed_backwards"]
    assert backwards == 2 * STEPS and summary["kept_graph_backwards"] > 0, summary
    assert summary["graph_resends"] <= summary["recomputed_backwards"]

    assert swarm.stop() == []
    assert ports_in_use(ports) == set(), "ports still bound after shutdown"


def test_training_survives_a_killed_worker(swarm_harness):
    swarm = swarm_harness.create(steps=STEPS, workers={"body1": 2})
    swarm.start()
    assert wait_for_trainer_step(swarm, 10, 180)
    for name in ("body1#0", "body1#1"):
        assert swarm.wait_for(name, ev.OptimizerStepped, timeout=60), f"{name} never trained: not load-balanced"

    swarm.kill("body1#1", signal.SIGKILL)  # the volunteer's machine vanishes: no goodbye, no cleanup

    assert run_trainer_to_end(swarm, 300) == 0
    summary = json.loads(swarm.summary_path.read_text())
    assert summary["completed"] == STEPS, summary
    assert summary["sent"] == summary["completed"] + sum(summary["dropped"].values())
    assert summary["retried"] + sum(summary["dropped"].values()) >= 1, "the dead worker's failure went unnoticed"
    assert swarm.process("body1#1").popen.wait(10) == -signal.SIGKILL


def test_an_emptied_stage_pauses_the_trainer_until_a_worker_returns(swarm_harness):
    swarm = swarm_harness.create(steps=STEPS)
    swarm.start()
    assert wait_for_trainer_step(swarm, 10, 180)

    swarm.kill("body1#0", signal.SIGKILL)  # the stage's only worker vanishes
    assert swarm.wait_for("trainer", ev.TrainerPaused, lambda e: "body1" in e.stages, timeout=60)
    paused_at = swarm.events_sent("trainer")  # no resume before the worker is back
    restarted = swarm.start_worker("body1", 0)  # the volunteer comes back, same identity
    assert swarm.wait_for("body1#0", ev.ServerStarted, timeout=120, since=restarted.first_event)
    assert swarm.wait_for("trainer", ev.TrainerResumed, timeout=120, since=paused_at)

    assert run_trainer_to_end(swarm, 300) == 0
    summary = json.loads(swarm.summary_path.read_text())
    assert summary["completed"] == STEPS, summary
    assert summary["sent"] == summary["completed"] + sum(summary["dropped"].values()), "every micro-batch is accounted for"
    assert summary["pauses"] and summary["longest_stall"] >= max(length for _, length in summary["pauses"]) * 0.5
    assert swarm.process("body1#0") is restarted and restarted.popen.poll() is None, "the trainer did not crash the returning worker"


def test_micro_batches_a_stop_abandons_count_as_cancelled_not_failed(swarm_harness):
    swarm = swarm_harness.create(steps=10**6)  # runs until stopped, as `--local` without --steps
    swarm.start()
    assert wait_for_trainer_step(swarm, 10, 180)
    swarm.kill("body1#0", signal.SIGKILL)  # what is in flight now waits for a body1 worker that never comes
    paused = swarm.wait_for("trainer", ev.TrainerPaused, timeout=60)
    assert paused is not None and paused.in_flight > 0
    assert swarm.stop() == []  # SIGTERM to the trainer first: the stop the participant asked for

    (finished,) = swarm.events_of("trainer", ev.TrainerFinished)
    # a micro-batch already past body1 on its way back (at the head's backward) may still finish
    assert finished.stopped and 1 <= finished.cancelled <= paused.in_flight, finished
    assert finished.dropped == {}, "abandoned because of the stop, not failed"
    summary = json.loads(swarm.summary_path.read_text())
    assert summary["stopped"] and summary["dropped"] == {"cancelled": finished.cancelled}
    assert summary["sent"] == summary["completed"] + finished.cancelled
    line = outcome_line(finished, trainer_code=0, stopped_by_user=True, log_dir="logs", summary=None, dashboard=None)
    assert line.startswith(f"[LOCAL] Stopped by you after {finished.completed} micro-batches")
    assert f"{finished.cancelled} in flight cancelled by the stop" in line and "none dropped" in line
