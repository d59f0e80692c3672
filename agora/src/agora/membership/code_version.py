"""The hash the coordinator compares to refuse modified or stale installations ("Verification failed.")."""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path

import agora
import agora_server


@cache
def code_version() -> str:
    """sha256 over the path and bytes of every Python source file of both packages, in a fixed order."""
    digest = hashlib.sha256()
    for package in (agora, agora_server):
        root = Path(package.__file__).resolve().parent
        for path in sorted(root.rglob("*.py")):
            digest.update(f"{package.__name__}/{path.relative_to(root).as_posix()}\0".encode())
            digest.update(path.read_bytes())
            digest.update(b"\0")
    return digest.hexdigest()
