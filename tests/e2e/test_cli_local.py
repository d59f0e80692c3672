"""``python3 agora_cli.py --local`` as a participant runs it: what it prints, and that it cleans up."""

import os
import subprocess
import sys
import uuid
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]


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


def test_local_swarm_command_prints_the_guide_tags_and_cleans_up():
    marker = uuid.uuid4().hex
    result = subprocess.run(
        [sys.executable, str(REPO / "agora_cli.py"), "--local", "--steps", "60"],
        cwd=REPO,
        env=dict(os.environ, AGORA_TEST_MARKER=marker),
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr[-3000:]
    for tag in ("[SERVER] Training started", "[TRAINING] Training step 1", "[PROGRESS] Processed", "[TRAINER] step 60 | loss"):
        assert tag in out, f"missing {tag!r} in output"
    assert "Finished: 60 micro-batches completed of 60 sent" in out
    assert "[LOCAL] Swarm stopped; no process left running." in out
    assert processes_marked(marker) == set(), "processes left running after the CLI exited"
