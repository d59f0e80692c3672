"""``agora_cli.py`` from a plain interpreter: it enters the repo's environment and does not reinstall."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BASE_PYTHON = Path(sys.base_prefix) / "bin" / "python3"


@pytest.mark.skipif(sys.prefix != str(REPO / ".venv"), reason="checks the repo's own .venv, which this run does not use")
def test_second_run_hands_over_without_installing():
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "AGORA_CLI_REEXEC", "PYTHONPATH")}
    result = subprocess.run(
        [str(BASE_PYTHON), str(REPO / "agora_cli.py"), "--help"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "--workers-per-stage" in result.stdout, "did not reach the Agora CLI"
    assert "[SETUP]" not in result.stderr, f"bootstrap did setup work on a second run: {result.stderr}"


def test_third_party_licenses_match_the_installed_packages():
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "third_party_licenses.py"), "--check"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
