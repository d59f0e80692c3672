"""Helpers that run real swarms on 127.0.0.1 and always take them down, even when a test fails."""

import asyncio
import io
import threading
from pathlib import Path

import psutil
import pytest
import yaml
from hivemind import DHT

from agora.config import deep_merge, load_run_config
from agora.local_swarm import LocalSwarm
from agora_server.telemetry import events as ev

# faster reports and shorter bans than the shipped config, so tests see events within seconds
TEST_OVERRIDES = {
    "server": {"progress_interval": 3, "announce_period": 2},
    "trainer": {"refresh_period": 1, "ban_seconds": 3, "request_timeout": 20, "stage_wait_timeout": 60},
}


def write_config(directory: Path, overrides: dict | None = None, name: str = "run") -> tuple[str, object]:
    config = load_run_config("local-tiny", deep_merge(TEST_OVERRIDES, overrides or {}))
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return str(path), config


@pytest.fixture
def dhts():
    """Two DHT nodes on 127.0.0.1, the second bootstrapped from the first."""
    first = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    second = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=[str(m) for m in first.get_visible_maddrs()])
    yield first, second
    second.shutdown()
    first.shutdown()


@pytest.fixture
def rpc_loop():
    """The worker's RPC loop: an event loop on a thread of its own."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


class SwarmHarness:
    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.swarms: list[LocalSwarm] = []

    def create(self, overrides: dict | None = None, **kwargs) -> LocalSwarm:
        name = f"swarm{len(self.swarms)}"
        overrides = deep_merge({"server": {"checkpoint_dir": str(self.tmp_path / name / "checkpoints")}}, overrides or {})
        ref, config = write_config(self.tmp_path, overrides, name)
        swarm = LocalSwarm(ref, config, log_dir=self.tmp_path / name / "logs", output=io.StringIO(), **kwargs)
        self.swarms.append(swarm)
        return swarm

    def stop_all(self) -> list[str]:
        leftovers = []
        for swarm in self.swarms:
            leftovers += swarm.stop()
        return leftovers


@pytest.fixture
def swarm_harness(tmp_path):
    harness = SwarmHarness(tmp_path)
    try:
        yield harness
    finally:
        leftovers = harness.stop_all()
        assert not leftovers, f"processes left running: {leftovers}"


def run_trainer_to_end(swarm: LocalSwarm, timeout: float) -> int:
    code = swarm.wait_for_trainer(threading.Event(), timeout=timeout)
    assert code is not None, f"trainer did not finish within {timeout}s"
    return code


def ports_in_use(ports: set[int]) -> set[int]:
    return {c.laddr.port for c in psutil.net_connections(kind="tcp") if c.laddr and c.laddr.port in ports and c.status == psutil.CONN_LISTEN}


def wait_for_trainer_step(swarm: LocalSwarm, step: int, timeout: float) -> bool:
    """The trainer reported at least ``step`` completed micro-batches (reports land on the first count
    past each multiple of report_every, so the exact number may be higher)."""
    reached = swarm.wait_for_event("trainer", lambda e: isinstance(e, ev.TrainerReport) and e.step >= step, timeout)
    return reached is not None


def trainer_step(swarm: LocalSwarm) -> int:
    """The trainer's latest reported count of completed micro-batches (0 before its first report)."""
    return max((e.step for e in swarm.events_of("trainer", ev.TrainerReport)), default=0)


def wait_for_worker_step(swarm: LocalSwarm, name: str, step: int, timeout: float) -> bool:
    """The worker took at least ``step`` optimizer steps (a worker that follows its stage jumps over
    step numbers, so the exact one may never be printed)."""
    reached = swarm.wait_for_event(name, lambda e: isinstance(e, ev.OptimizerStepped) and e.step >= step, timeout)
    return reached is not None
