"""Dishonest workers in a live local swarm: the trainer judges them by what they do, not by what
they announce."""

from __future__ import annotations

from agora_server.telemetry import events as ev
from tests.helpers.refusing_worker import refusing_worker
from tests.helpers.swarms import run_trainer_to_end


def test_a_worker_that_refuses_every_call_is_banned_and_training_goes_on(swarm_harness):
    swarm = swarm_harness.create(steps=60)
    swarm.start(trainer=False)
    with refusing_worker(["--run", swarm.config.run_name, "--stage", "body1", "--initial_peers", *swarm.seed_maddrs]) as refuser:
        ready = refuser.wait_ready(180)
        # the trainer starts with it announced: on a loaded machine a refuser started later can miss a 60-step run
        swarm.start_trainer()
        banned = swarm.wait_for("trainer", ev.WorkerBanned, lambda e: e.peer_id == ready["peer_id"], timeout=180)
        assert banned is not None, "the trainer never tried (or never banned) the worker that claims 1e9 tokens/s"
        assert banned.reason.startswith("refused"), banned.reason
        assert run_trainer_to_end(swarm, 400) == 0
    [finished] = swarm.events_of("trainer", ev.TrainerFinished)
    assert finished.completed == 60, finished
    assert not any(reason.startswith("refused") for reason in finished.dropped), \
        f"micro-batches the refusing worker drew were dropped instead of retried elsewhere: {finished.dropped}"
    # banned with a growing backoff: a handful of calls, not a share of every micro-batch
    assert refuser.refused <= 10, refuser.refused
