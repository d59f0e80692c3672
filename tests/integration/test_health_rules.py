"""Each health rule fires on its induced condition in a real worker process, which exits non-zero
with the rule's message."""

import asyncio
import contextlib
import os
import signal

import torch
from hivemind import DHT

from agora_server.pipeline.remote import StageCaller
from agora_server.telemetry import events as ev
from agora_server.telemetry.health import ALLREDUCE_MESSAGE, RAM_MESSAGE
from agora_server.wire import Rpc
from tests.helpers.worker_rpc import find_worker, packed, valid_inputs

FAST_STATS = {"stats_interval": 1}


def start_body_worker(swarm_harness, server: dict, workers: int = 1):
    swarm = swarm_harness.create({"server": server}, workers={"head": 0, "body1": workers, "tail": 0})
    swarm.start(trainer=False)
    for index in range(workers):
        assert swarm.wait_for(f"body1#{index}", ev.ServerStarted, timeout=120)
    return swarm


def exits_with(swarm, name: str, message: str, timeout: float = 120) -> None:
    stop = swarm.wait_for(name, ev.HealthStop, lambda e: e.message.startswith(message), timeout=timeout)
    assert stop, f"{name} never stopped with {message!r}"
    # shutdown waits out an averaging round that is still running (its deadline: matchmaking + averaging
    # timeouts); on a loaded 2-core machine that was seen to take over a minute
    assert swarm.process(name).popen.wait(150) == 1, "a worker stopped by a health rule exits non-zero"


def test_ram_rule(swarm_harness):
    swarm = start_body_worker(swarm_harness, {**FAST_STATS, "health": {"max_ram_percent": 0.5}})  # any real machine uses more
    exits_with(swarm, "body1#0", RAM_MESSAGE)


def test_no_progress_rule(swarm_harness):
    swarm = start_body_worker(swarm_harness, {**FAST_STATS, "health": {"no_progress_seconds": 4}})  # no trainer: no work
    exits_with(swarm, "body1#0", "No training progress for")


def test_non_finite_gradients_rule(swarm_harness):
    # a trainer that sends absurd (finite) gradients: every epoch's gradient norm overflows, every step is skipped
    swarm = start_body_worker(swarm_harness, {**FAST_STATS, "target_batch_size": 2, "health": {"max_non_finite_steps": 2}})
    config = swarm.config
    dht = DHT(initial_peers=swarm.seed_maddrs, client_mode=True, start=True)

    async def send_absurd_gradients():
        peer = await find_worker(dht, config)
        p2p = await dht.replicate_p2p()
        caller = StageCaller(p2p, config.run_name, torch.float32, config.boundary_width)
        tokens, values = valid_inputs(config)
        huge = torch.full_like(values, 3e38)
        try:
            for _ in range(4):
                # the answers carry infinite gradients, which the caller rejects: only the worker's side matters here
                with contextlib.suppress(Exception):
                    await caller.call(peer, "body1", config.stage("body1").kind, Rpc.BACKWARD, [packed(values, tokens), huge], timeout=30)
        finally:
            await p2p.shutdown()

    try:
        asyncio.run(send_absurd_gradients())
    finally:
        dht.shutdown()
    exits_with(swarm, "body1#0", "Gradients stayed NaN or infinite for 2 optimizer steps in a row. Exiting run.")
    assert swarm.wait_for("body1#0", ev.NonFiniteGradients, lambda e: e.grad_norm == float("inf"), timeout=5)


def test_failed_averaging_rounds_rule(swarm_harness):
    # the other worker of the stage stalls (SIGSTOP): its DHT record stays valid, so rounds keep
    # trying to include it and time out
    averaging = {"average_every": 1, "fraction": 0.5, "matchmaking_time": 1.0, "request_timeout": 0.5, "averaging_timeout": 5.0}
    server = {"announce_period": 60, "averaging": averaging, "health": {"max_failed_rounds": 2, "failed_rounds_window": 3}}
    swarm = swarm_harness.create({"server": server}, steps=400, workers={"body1": 2})
    swarm.start()
    for name in ("body1#0", "body1#1"):
        assert swarm.wait_for(name, ev.OptimizerStepped, timeout=240)
    stalled = swarm.process("body1#1").popen.pid
    with contextlib.suppress(ProcessLookupError):  # on a loaded machine its own rounds may already have stopped it
        os.killpg(stalled, signal.SIGSTOP)
    try:
        exits_with(swarm, "body1#0", ALLREDUCE_MESSAGE, timeout=240)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(stalled, signal.SIGCONT)  # so that the harness can stop it cleanly
