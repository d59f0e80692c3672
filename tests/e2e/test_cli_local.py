"""``python3 agora_cli.py --local`` as a participant runs it: what it prints, and that it cleans up."""

import subprocess
import sys
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]


def agora_processes() -> set[int]:
    found = set()
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "agora.run_server" in cmdline or "agora.run_seed" in cmdline or "agora.trainer" in cmdline or "hivemind_cli/p2pd" in cmdline:
            found.add(proc.pid)
    return found


def test_local_swarm_command_prints_the_guide_tags_and_cleans_up():
    before = agora_processes()
    result = subprocess.run(
        [sys.executable, str(REPO / "agora_cli.py"), "--local", "--steps", "60"],
        cwd=REPO,
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
    assert agora_processes() - before == set()
