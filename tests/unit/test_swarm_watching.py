"""LocalSwarm is watched through its children's typed events: a child that writes event lines and one
plain line, read back by ``wait_for`` (kind, condition, count, since) and ``texts_of``."""

import io

import pytest

from agora.config import load_run_config
from agora.local_swarm import LocalSwarm
from agora_server.telemetry import events as ev
from agora_server.telemetry.eventstream import encode_event

STEPS = [ev.OptimizerStepped(stage="body1", step=step, grad_norm=1.0, lr=1e-3) for step in (1, 2, 3)]


def child_script(plain: str) -> str:
    """A child that prints two steps as event lines, a line that is no event, the third step, and ends."""
    lines = [encode_event(e) for e in STEPS[:2]] + [plain] + [encode_event(STEPS[2])]
    return f"for line in {lines!r}:\n    print(line, flush=True)\n"


@pytest.fixture
def swarm(tmp_path):
    swarm = LocalSwarm("local-tiny", load_run_config("local-tiny"), log_dir=tmp_path, output=io.StringIO(), grace_seconds=5)
    yield swarm
    assert swarm.stop() == []


def test_waits_find_events_by_kind_condition_count_and_start(swarm):
    child = swarm._spawn("body1#0", ["-c", child_script("a warning from a library")])
    assert swarm.wait_for("body1#0", ev.OptimizerStepped, lambda e: e.step >= 2, timeout=30) == STEPS[1]
    assert swarm.wait_for("body1#0", ev.OptimizerStepped, count=3, timeout=30) == STEPS[2]
    assert swarm.wait_for("body1#0", ev.OptimizerStepped, since=2, timeout=30) == STEPS[2], "the events before index 2 are passed over"
    assert swarm.wait_for("body1#0", ev.OptimizerStepped, count=4, timeout=0.2) is None
    assert swarm.wait_for("body1#0", ev.ServerStarted, timeout=0.2) is None, "no event of another kind stands in"
    assert swarm.events_of("body1#0", ev.OptimizerStepped) == STEPS
    assert swarm.texts_of("body1#0") == ["a warning from a library"], "a line that is no event is kept as text, not as an event"
    assert child.first_event == 0 and swarm.events_sent("body1#0") == 3


def test_a_restarted_child_is_watched_from_its_own_first_event(swarm):
    first = swarm._spawn("body1#0", ["-c", child_script("first run")])
    assert swarm.wait_for("body1#0", ev.OptimizerStepped, count=3, timeout=30)
    assert first.popen.wait(30) == 0
    first.pump.join(5)
    second = swarm._spawn("body1#0", ["-c", child_script("second run")])
    assert second.first_event == 3
    assert swarm.wait_for("body1#0", ev.OptimizerStepped, count=3, since=second.first_event, timeout=30) == STEPS[2]
    assert swarm.events_sent("body1#0") == 6 and swarm.process("body1#0") is second
