"""The coordinator's Ed25519 key: created once (mode 0600), kept across restarts, signs access tokens."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agora_server.access import AccessClaims, encode_public_key, issue_access_token

KEY_MODE = 0o600


def load_or_create_key(path: str | Path) -> Ed25519PrivateKey:
    path = Path(path).expanduser()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        # O_EXCL: two coordinators started at once must not overwrite each other's fresh key
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, KEY_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
    if stat.S_IMODE(path.stat().st_mode) != KEY_MODE:
        os.chmod(path, KEY_MODE)
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} holds a {type(key).__name__}, not an Ed25519 private key")
    return key


class AccessSigner:
    def __init__(self, key: Ed25519PrivateKey):
        self._key = key
        self.public_key = encode_public_key(key.public_key())

    def issue(self, claims: AccessClaims) -> str:
        return issue_access_token(claims, self._key)
