"""The worker's persistent libp2p identity: one private key file per GPU, readable only by its owner."""

from __future__ import annotations

import os
import stat
from pathlib import Path

KEY_MODE = 0o600


def ensure_identity(path: str | Path) -> Path:
    """Create the key file if it is missing; keep its mode at 0600 either way."""
    from hivemind.p2p import P2P  # heavy import, only when a key is really needed

    path = Path(path).expanduser()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        P2P.generate_identity(str(path))
    if stat.S_IMODE(path.stat().st_mode) != KEY_MODE:
        os.chmod(path, KEY_MODE)
    return path
