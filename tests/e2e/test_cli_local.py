"""``python3 agora_cli.py --local`` as a participant runs it: what it prints, that it cleans up, and that
it works every time in the same checkout — again right after a run, and after its CLI was killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
LOG_DIR = REPO / "logs" / "local"
MAX_QUIET_LINES = 40


def processes_marked(marker: str) -> set[int]:
    """Processes that inherited this run's marker: the CLI's children, their DHT processes, p2pd."""
    found = set()
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("AGORA_TEST_MARKER") == marker and proc.status() != psutil.STATUS_ZOMBIE:
                found.add(proc.pid)
        except psutil.Error:
            continue
    return found


def kill_marked(marker: str) -> None:
    for pid in processes_marked(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def local_command(*args: str) -> list[str]:
    return [sys.executable, str(REPO / "agora_cli.py"), "--local", *args]


def run_local(marker: str, *args: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(local_command(*args), cwd=REPO, env=dict(os.environ, AGORA_TEST_MARKER=marker),
                              capture_output=True, text=True, timeout=600)
    finally:
        kill_marked(marker)  # a failed run must not leave its swarm behind for the next test


def served_stages() -> dict[str, str]:
    """Each worker's label (from its status file's name) → the stage it says it served."""
    found = {}
    for path in LOG_DIR.glob("server_*_*.status.json"):
        label = path.name.removeprefix("server_").removesuffix(".status.json")
        found[label] = json.loads(path.read_text())["stage"]
    return found


def assert_clean_run(result: subprocess.CompletedProcess, steps: int) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((LOG_DIR / "trainer-summary.json").read_text())
    assert summary["completed"] == steps and summary["sent"] == steps, summary
    stages = served_stages()
    assert sorted(stages) == ["body1_0", "head_0", "tail_0"], stages
    for label, stage in stages.items():
        assert label.rsplit("_", 1)[0] == stage, f"worker {label} served stage {stage}"


def test_the_default_console_is_short_and_ends_with_the_outcome():
    marker = uuid.uuid4().hex
    result = run_local(marker, "--steps", "60")
    assert_clean_run(result, 60)
    lines = result.stdout.splitlines()
    assert len(lines) <= MAX_QUIET_LINES, "\n".join(lines)
    assert lines[0].startswith("[LOCAL] Starting a local swarm")
    assert any(line.startswith("[LOCAL] Dashboard (live charts): http://127.0.0.1:") for line in lines)
    for stage in ("head", "body1", "tail"):
        assert f"[SERVER] Training started on stage {stage}" in result.stdout
    reports = [line for line in lines if "[TRAINER] micro-batches " in line]
    assert reports and "[TRAINER] micro-batches 60/60 | loss " in reports[-1], reports
    assert "validation " in reports[-1] and "stages served 3/3" in reports[-1]
    # worker detail stays in the log files
    assert "[TRAINING] Training step" not in result.stdout and "[PROGRESS]" not in result.stdout
    assert "OptimizerStepped" in (LOG_DIR / "server_body1_0.log").read_text()
    last = lines[-1]
    assert last.startswith("[LOCAL] Done: 60 micro-batches in "), last
    assert "loss " in last and "validation " in last and "none dropped" in last
    assert "summary: logs/local/trainer-summary.json" in last and "dashboard: logs/local/dashboard.html" in last
    assert (LOG_DIR / "dashboard.html").read_text().count('"peer_id"') >= 3, "the saved dashboard carries the run's nodes"
    assert processes_marked(marker) == set(), "processes left running after the CLI exited"


def test_the_local_swarm_runs_again_right_after_a_run_and_after_its_cli_was_killed():
    first, second, killed, after = (uuid.uuid4().hex for _ in range(4))
    assert_clean_run(run_local(first, "--steps", "30"), 30)
    # the previous run's coordinator database held three active workers for 30 minutes; a new run must not see them
    assert_clean_run(run_local(second, "--steps", "30"), 30)

    cli = subprocess.Popen(local_command("--steps", "0"), cwd=REPO, env=dict(os.environ, AGORA_TEST_MARKER=killed),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in cli.stdout:  # the swarm is up and training
            if "[TRAINER] micro-batches " in line:
                break
        else:
            raise AssertionError("the swarm to be killed never trained")
        cli.kill()  # SIGKILL: no handler runs, the CLI cannot stop its children itself
        cli.wait(10)
        result = run_local(after, "--steps", "30")
    finally:
        cli.kill()
        kill_marked(killed)
    assert_clean_run(result, 30)
    deadline = time.monotonic() + 30
    while processes_marked(killed) and time.monotonic() < deadline:  # gone already, or going: told by the kernel
        time.sleep(0.5)
    assert processes_marked(killed) == set(), "the killed run's processes outlived the next run's start"
    assert processes_marked(after) == set()
