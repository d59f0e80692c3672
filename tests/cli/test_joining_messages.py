"""When joining cannot work, the participant is told which address, from which file, failed and what
to do — on the console, in the worker's log and in `status`. Real CLI, real worker, real sockets."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.cli.conftest import REPO, free_port
from tests.cli.test_wizard_pty import TOKEN


def cli(participant, *args: str, run_json=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "agora_cli.py"), "--run_json", str(run_json or participant.run_json), *args],
                          cwd=participant.workdir, env=participant.env(), capture_output=True, text=True, timeout=300)


def test_an_unreachable_coordinator_names_the_address_its_file_and_what_to_do(participant):
    address = json.loads(participant.run_json.read_text())["auth_server"]  # a port nothing listens on
    result = cli(participant, "--skip_input", "--token", TOKEN, "--host_port", str(free_port()))
    said = result.stdout + result.stderr
    assert result.returncode == 1, said
    assert f"[PREFLIGHT] WARN Coordinator the coordinator at {address} (auth_server in {participant.run_json}) did not answer" in said
    assert f"[AUTH] Could not reach the coordinator at {address} (ConnectError" in said
    assert "Server exited with 1" in said
    assert f"The address came from auth_server in {participant.run_json}" in said
    assert "python3 agora_cli.py --local" in said, "a way to see Agora work without a run"
    log = (participant.workdir / "logs" / "server_gpu0.log").read_text()
    assert "ProcessError" in log and f"Could not reach the coordinator at {address}" in log, "the log says why, too"
    status = subprocess.run([sys.executable, str(REPO / "agora_cli.py"), "status"], env=participant.env(),
                            capture_output=True, text=True, timeout=60).stdout
    assert "exited with code 1" in status and f"GPU 0: Could not reach the coordinator at {address}" in status, status
    assert TOKEN not in said + log + status


def test_the_shipped_placeholder_coordinator_stops_the_preflight_and_points_to_the_local_swarm(participant):
    shipped = REPO / "run.json"
    result = cli(participant, "--skip_input", "--token", TOKEN, "--host_port", str(free_port()), run_json=shipped)
    said = result.stdout + result.stderr
    placeholder = json.loads(shipped.read_text())["auth_server"]
    assert result.returncode == 1, said
    assert f"[PREFLIGHT] FAIL Coordinator {shipped} names no real coordinator: auth_server is the placeholder {placeholder}." in said
    assert "python3 agora_cli.py --local --steps 300" in said
    assert "the worker was not started" in said
    assert not (participant.home / ".agora" / "instance_gpu0.json").exists()
