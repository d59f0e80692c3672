#!/usr/bin/env python3
"""Agora's entry point: sets up the Python environment, then runs the CLI.

Standard library only, so it runs on a fresh machine with nothing but Python.
First run: creates .venv (unless a virtual environment is already active) and
installs the pinned dependencies; later runs hand over straight away.
"""
import sys

# Checked before any function is defined, so Python 3.6-3.10 print this message instead
# of a traceback. For that the whole file must still parse on 3.6: no walrus, no match.
if sys.version_info < (3, 11):
    sys.exit("Agora needs Python 3.11 or newer; this is Python %d.%d. "
             "Install Python 3.11+ and run it with that interpreter, e.g. python3.11 agora_cli.py"
             % sys.version_info[:2])

import hashlib
import json
import os
import shutil
import subprocess
import time
import venv

SCRIPT = os.path.abspath(__file__)
REPO = os.path.dirname(SCRIPT)
VENV_DIR = os.path.join(REPO, ".venv")
# Files whose content decides what gets installed; changing any of them triggers a reinstall.
INPUT_FILES = ("constraints.txt", "agora_server/pyproject.toml", "agora/pyproject.toml")


def setup_message(text: str) -> None:
    # stderr, so the CLI's own stdout stays clean for pipes.
    print(f"[SETUP] {text}", file=sys.stderr, flush=True)


def in_virtualenv() -> bool:
    return sys.prefix != sys.base_prefix


def venv_python() -> str:
    if os.name == "nt":
        return os.path.join(VENV_DIR, "Scripts", "python.exe")
    return os.path.join(VENV_DIR, "bin", "python")


def ensure_venv() -> str:
    """Create <repo>/.venv with pip if it has no interpreter yet; return that interpreter."""
    python = venv_python()
    if not os.path.exists(python):
        setup_message("Creating virtual environment in .venv")
        try:
            venv.EnvBuilder(with_pip=True).create(VENV_DIR)
        except Exception as exc:  # e.g. Debian/Ubuntu without the python3-venv package
            shutil.rmtree(VENV_DIR, ignore_errors=True)  # a half-made .venv would be reused next run
            sys.exit(f"[SETUP] Could not create .venv: {exc}\n"
                     "On Debian/Ubuntu install the venv module first "
                     "(apt install python3.11-venv or python3-venv), then re-run.")
    return python


def reexec(python: str, argv: list[str]) -> None:
    # Guard against a loop if the target interpreter does not report itself as a venv.
    if os.environ.get("AGORA_CLI_REEXEC") == python:
        sys.exit(f"[SETUP] {python} does not run as a virtual environment; delete .venv and re-run.")
    os.environ["AGORA_CLI_REEXEC"] = python
    os.execv(python, [python, SCRIPT, *argv])


def install_digest(extras: list[str]) -> str:
    digest = hashlib.sha256()
    for name in INPUT_FILES:
        with open(os.path.join(REPO, name), "rb") as f:
            digest.update(name.encode() + b"\0" + f.read() + b"\0")
    digest.update(",".join(sorted(extras)).encode())
    return digest.hexdigest()


def stamp_path() -> str:
    # Inside the environment, so a new or different environment always gets its own install.
    return os.path.join(sys.prefix, "agora-install.json")


def read_stamp() -> dict:
    try:
        with open(stamp_path(), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def is_installed(stamp: dict, extras: list[str]) -> bool:
    """True if the stamp covers the current input files and at least the wanted extras."""
    done = stamp.get("extras", [])
    return set(extras) <= set(done) and stamp.get("sha256") == install_digest(done)


def pip_install(extras: list[str]) -> None:
    suffix = f"[{','.join(extras)}]" if extras else ""
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
           "--constraint", "constraints.txt", "-e", "./agora_server", "-e", f"./agora{suffix}"]
    setup_message("Installing pinned dependencies (first run only)...")
    started = time.monotonic()
    result = subprocess.run(cmd, cwd=REPO, stdout=sys.stderr)
    if result.returncode != 0:
        rerun = " ".join(["python3", "agora_cli.py", *sys.argv[1:]])
        sys.exit(f"[SETUP] Installing dependencies failed (pip exit code {result.returncode}).\n"
                 "Check network access to the package index (PyPI or your configured mirror) "
                 f"and the pip errors above, then re-run: {rerun}")
    setup_message(f"Dependencies installed in {time.monotonic() - started:.0f}s")


def write_stamp(extras: list[str]) -> None:
    tmp = stamp_path() + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"sha256": install_digest(extras), "extras": sorted(extras)}, f)
    os.replace(tmp, stamp_path())  # atomic: an interrupted write never leaves a half stamp


def ensure_installed(argv: list[str]) -> bool:
    """Install into the current environment unless the stamp says it is done; True if it installed."""
    wanted = ["test"] if argv[:1] == ["test"] else []
    stamp = read_stamp()
    if is_installed(stamp, wanted):
        return False
    # Keep extras installed earlier, so `test` then `--help` does not flip-flop reinstalling.
    extras = sorted(set(wanted) | set(stamp.get("extras", [])))
    if os.path.exists(stamp_path()):
        os.remove(stamp_path())  # a failed install must not leave an old stamp that still matches
    pip_install(extras)
    write_stamp(extras)
    return True


def main() -> None:
    argv = sys.argv[1:]
    if not in_virtualenv():
        reexec(ensure_venv(), argv)
    os.environ.pop("AGORA_CLI_REEXEC", None)  # in a venv now; don't leak it to child processes
    if ensure_installed(argv):
        # Fresh editable installs are .pth files, which Python reads only at startup.
        os.execv(sys.executable, [sys.executable, SCRIPT, *argv])
    from agora.cli.main import main as agora_main
    sys.exit(agora_main(argv))


if __name__ == "__main__":
    main()
