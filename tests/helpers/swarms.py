"""Real swarms on 127.0.0.1 for the integration tests (model: hivemind's ``tests/test_utils``): a
harness that always takes them down, and waits on their children's typed events."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import psutil
import yaml

from agora.config import deep_merge, load_run_config
from agora.local_swarm import LocalSwarm
from agora_server.telemetry import events as ev
from agora_server.telemetry.console import console_lines

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


def run_trainer_to_end(swarm: LocalSwarm, timeout: float) -> int:
    code = swarm.wait_for_trainer(threading.Event(), timeout=timeout)
    assert code is not None, f"trainer did not finish within {timeout}s"
    return code


def ports_in_use(ports: set[int]) -> set[int]:
    return {c.laddr.port for c in psutil.net_connections(kind="tcp") if c.laddr and c.laddr.port in ports and c.status == psutil.CONN_LISTEN}


def wait_for_trainer_step(swarm: LocalSwarm, step: int, timeout: float) -> bool:
    """The trainer reported at least ``step`` completed micro-batches (reports land on the first count
    past each multiple of report_every, so the exact number may be higher)."""
    return swarm.wait_for("trainer", ev.TrainerReport, lambda e: e.step >= step, timeout=timeout) is not None


def trainer_step(swarm: LocalSwarm) -> int:
    """The trainer's latest reported count of completed micro-batches (0 before its first report)."""
    return max((e.step for e in swarm.events_of("trainer", ev.TrainerReport)), default=0)


def wait_for_worker_step(swarm: LocalSwarm, name: str, step: int, timeout: float) -> bool:
    """The worker took at least ``step`` optimizer steps (a worker that follows its stage jumps over
    step numbers, so the exact one may never be printed)."""
    return swarm.wait_for(name, ev.OptimizerStepped, lambda e: e.step >= step, timeout=timeout) is not None


def console_text(swarm: LocalSwarm, name: str) -> str:
    """What a participant reads of a child: its events' console lines, then the lines it printed that
    were no event. For tests whose point is that wording (or what it must never show)."""
    rendered = [line for event in swarm.events_of(name, ev.Event) for line in console_lines(event)]
    return "\n".join([*rendered, *swarm.texts_of(name)])
