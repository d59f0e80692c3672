#!/usr/bin/env python3
"""Regenerate constraints.txt from the packages installed in the current environment.

Usage (after adding or changing a dependency in a pyproject.toml):

    python3 agora_cli.py test --help          # installs the new requirements into .venv
    .venv/bin/python scripts/update_constraints.py

Rules: pins come from `pip freeze --all` of this interpreter; pip, agora/agora_server
and editable or direct-URL entries are left out; local version labels are dropped
(torch==2.13.0+cpu -> torch==2.13.0) so the same pin resolves to the CUDA build
on GPU machines. Fails if a direct dependency of either package is not pinned.
If pip reports a conflict with an old pin while installing a new dependency,
delete that pin from constraints.txt, install, then regenerate.
"""
from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUTPUT = REPO / "constraints.txt"
OWN_PACKAGES = {"agora", "agora-server"}
# pip is the installer, not a dependency. setuptools is kept: grpcio-tools needs it at run time.
SKIPPED = OWN_PACKAGES | {"pip"}
PYPROJECTS = (REPO / "agora_server" / "pyproject.toml", REPO / "agora" / "pyproject.toml")

HEADER = """\
# Pinned versions of Agora's direct and transitive dependencies, used by
# agora_cli.py as `pip install --constraint constraints.txt ...`.
#
# Produced by scripts/update_constraints.py from `pip freeze --all` (less pip and
# Agora's own packages) of an environment where agora_server and agora[test]
# were installed (Python {python}, {platform}).
# Local version labels are stripped (torch==2.13.0, not 2.13.0+cpu) so the same
# pin resolves to the CUDA build from PyPI on GPU machines.
#
# Regenerate after changing dependencies in a pyproject.toml:
#     python3 agora_cli.py test --help
#     .venv/bin/python scripts/update_constraints.py
"""


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def frozen_pins() -> dict[str, str]:
    """Map normalized name -> 'Name==version' for every pinnable installed distribution."""
    out = subprocess.run([sys.executable, "-m", "pip", "freeze", "--all", "--exclude-editable"],
                         check=True, capture_output=True, text=True).stdout
    pins = {}
    for line in out.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or line.startswith("-e"):
            continue
        if "==" not in line:  # `name @ file:///...` and other direct references are not portable
            print(f"skipping unpinnable entry: {line}", file=sys.stderr)
            continue
        name, version = line.split("==", 1)
        if normalize(name) in SKIPPED:
            continue
        pins[normalize(name)] = f"{name}=={version.split('+', 1)[0]}"
    return pins


def direct_dependencies() -> set[str]:
    """Normalized names of every dependency (extras included) declared in the pyprojects."""
    names = set()
    for path in PYPROJECTS:
        project = tomllib.loads(path.read_text(encoding="utf-8"))["project"]
        requirements = list(project.get("dependencies", []))
        for extra in project.get("optional-dependencies", {}).values():
            requirements += extra
        for requirement in requirements:
            names.add(normalize(re.match(r"[A-Za-z0-9._-]+", requirement.strip()).group(0)))
    return names - OWN_PACKAGES


def main() -> int:
    pins = frozen_pins()
    missing = sorted(direct_dependencies() - pins.keys())
    if missing:
        print(f"not installed here, so not pinned: {', '.join(missing)}\n"
              "Install them first (python3 agora_cli.py test --help), then re-run.", file=sys.stderr)
        return 1
    header = HEADER.format(python=".".join(map(str, sys.version_info[:2])), platform=sys.platform)
    body = "\n".join(pins[name] for name in sorted(pins))
    OUTPUT.write_text(header + "\n" + body + "\n", encoding="utf-8")
    print(f"wrote {len(pins)} pins to {OUTPUT.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
