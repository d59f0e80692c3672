"""Debian packages the test suite runs for real (not Python packages): installed by ``agora_cli.py test``
when missing, so that a fresh machine runs the whole suite with one command."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

# executable -> Debian package that provides it
TEST_TOOLS = {
    "prometheus-pushgateway": "prometheus-pushgateway",
    "chromium": "chromium",
}


def missing_tools() -> dict[str, str]:
    return {exe: package for exe, package in TEST_TOOLS.items() if shutil.which(exe) is None}


def ensure_test_tools() -> list[str]:
    """Install what is missing through apt; return the executables still missing (with a message printed)."""
    missing = missing_tools()
    if not missing:
        return []
    packages = sorted(set(missing.values()))
    apt = shutil.which("apt-get")
    prefix = [] if os.geteuid() == 0 else ["sudo", "-n"]
    if apt is None or (prefix and shutil.which("sudo") is None):
        print(f"[TEST] Missing {', '.join(missing)}; install the Debian package(s) {' '.join(packages)} (no apt-get or root here).", file=sys.stderr)
        return list(missing)
    print(f"[TEST] Installing {' '.join(packages)} with apt-get (needed by the integration tests)...", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = [*prefix, apt, "install", "-y", "-q", "--no-install-recommends", *packages]
    if subprocess.call(install, env=env, stdout=subprocess.DEVNULL) != 0:
        subprocess.call([*prefix, apt, "update", "-q"], env=env, stdout=subprocess.DEVNULL)
        subprocess.call(install, env=env, stdout=subprocess.DEVNULL)
    still = list(missing_tools())
    if still:
        print(f"[TEST] Could not install {' '.join(packages)}; the tests that need {', '.join(still)} will fail.", file=sys.stderr)
    return still
