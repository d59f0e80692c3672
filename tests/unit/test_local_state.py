"""A local swarm's log directory belongs to one run: the next one stops what a killed run left behind
and starts without its state; a run still going is never disturbed. Real processes throughout."""

import json
import subprocess
import sys

import pytest

from agora.local_state import RecordedProcess, RunState, SwarmBusy, describe, group_members


def sleeper() -> subprocess.Popen:
    """A process in its own group, like every child of a swarm."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)


def write_record(log_dir, launcher: RecordedProcess, children: list[RecordedProcess]) -> None:
    record = {"launcher": launcher.__dict__, "children": [c.__dict__ for c in children]}
    (log_dir / "swarm.json").write_text(json.dumps(record))


def test_leftovers_of_a_killed_run_are_stopped_and_its_state_deleted(tmp_path):
    orphan, dead_launcher = sleeper(), sleeper()
    try:
        launcher = describe(dead_launcher.pid, "launcher")
        dead_launcher.kill()
        dead_launcher.wait()
        write_record(tmp_path, launcher, [describe(orphan.pid, "head#0")])
        for name in ("coordinator.db", "server_head_0.log", "server_head_0.log.1", "trainer-summary.json", "run.yaml"):
            (tmp_path / name).write_text("x")
        (tmp_path / "coordinator-checkpoints").mkdir()

        assert RunState(tmp_path).claim(grace=5) == ["head#0"]

        assert orphan.wait(10) is not None and not group_members(orphan.pid)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml", "swarm.json"], "only the swarm's own files go"
        assert json.loads((tmp_path / "swarm.json").read_text())["children"] == []
    finally:
        orphan.kill()


def test_a_run_whose_launcher_still_runs_is_left_alone(tmp_path):
    launcher, child = sleeper(), sleeper()
    try:
        write_record(tmp_path, describe(launcher.pid, "launcher"), [describe(child.pid, "head#0")])
        (tmp_path / "coordinator.db").write_text("in use")
        with pytest.raises(SwarmBusy, match=f"pid {launcher.pid}"):
            RunState(tmp_path).claim()
        assert child.poll() is None and (tmp_path / "coordinator.db").read_text() == "in use"
    finally:
        launcher.kill()
        child.kill()


def test_a_pid_reused_by_another_process_is_not_taken_for_the_recorded_one(tmp_path):
    bystander = sleeper()
    try:
        impostor = RecordedProcess("head#0", bystander.pid, describe(bystander.pid, "x").started - 1000)
        write_record(tmp_path, RecordedProcess("launcher", 1, 0.0), [impostor])
        assert RunState(tmp_path).claim(grace=1) == []
        assert bystander.poll() is None, "a process that merely has the recorded pid was stopped"
    finally:
        bystander.kill()
