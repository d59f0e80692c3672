"""The last worker of a stage whose partner left keeps training: rounds that find nobody to average
with are no failure of its own, so the failed-rounds health rule does not stop it."""

from __future__ import annotations

import os
import subprocess

import pytest

from agora_server.telemetry import events as ev

LONE_SECONDS = float(os.environ.get("AGORA_LONE_WORKER_SECONDS", 120))
"""How long the last worker must keep running alone: in CI, several times what the failed-rounds rule
needed to stop it before (about a minute, with rounds every epoch as here); issue 16's ten minutes
with AGORA_LONE_WORKER_SECONDS=600."""


@pytest.mark.timeout(LONE_SECONDS + 480)  # the swarm's start and the rounds before the partner leaves
def test_the_last_worker_of_a_stage_keeps_running_after_its_partner_leaves(swarm_harness):
    averaging = {"average_every": 1, "fraction": 0.5, "matchmaking_time": 1.0, "request_timeout": 0.5, "averaging_timeout": 5.0}
    server = {"averaging": averaging, "health": {"max_failed_rounds": 3, "failed_rounds_window": 4}}
    swarm = swarm_harness.create({"server": server}, steps=100_000, workers={"body1": 2})
    swarm.start()
    for name in ("body1#0", "body1#1"):
        assert swarm.wait_for(name, ev.OptimizerStepped, timeout=240)
    assert swarm.wait_for("body1#0", ev.AveragingRound, lambda e: e.ok, timeout=240), \
        "the two workers never averaged"
    rounds_before = len(swarm.events_of("body1#0", ev.AveragingRound))
    swarm.kill("body1#1")  # gone without a word: its DHT record outlives it until it expires

    last = swarm.process("body1#0").popen
    with pytest.raises(subprocess.TimeoutExpired):
        last.wait(LONE_SECONDS)
    assert not swarm.events_of("body1#0", ev.HealthStop)
    after = swarm.events_of("body1#0", ev.AveragingRound)[rounds_before:]
    assert any(not r.ok and not r.partner_online for r in after), \
        f"no round failed for want of a partner, so this test proved nothing: {after}"
    steps = swarm.events_of("body1#0", ev.OptimizerStepped)
    assert steps and steps[-1].step > 0
