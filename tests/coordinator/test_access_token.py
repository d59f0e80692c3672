"""The access-token format workers check peers with: only the coordinator's key, only until expiry."""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agora_server.access import AccessClaims, AccessTokenError, encode_public_key, issue_access_token, verify_access_token

NOW = 1_800_000_000.0


@pytest.fixture
def key():
    return Ed25519PrivateKey.generate()


def claims(**overrides) -> AccessClaims:
    base = dict(peer_id="QmPeer", stage="body1", username="alice", uid="u1", issued_at=NOW, expires_at=NOW + 600)
    return AccessClaims(**{**base, **overrides})


def test_valid_token_returns_its_claims(key):
    token = issue_access_token(claims(), key)
    assert verify_access_token(token, encode_public_key(key.public_key()), NOW + 599) == claims()


def test_expired_token_is_refused(key):
    token = issue_access_token(claims(), key)
    with pytest.raises(AccessTokenError, match="expired"):
        verify_access_token(token, key.public_key(), NOW + 600)


def test_token_from_another_key_is_refused(key):
    token = issue_access_token(claims(), Ed25519PrivateKey.generate())
    with pytest.raises(AccessTokenError, match="signature"):
        verify_access_token(token, key.public_key(), NOW)


def test_tampered_claims_are_refused(key):
    prefix, body, signature = issue_access_token(claims(), key).split(".")
    data = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    data["stage"] = "head"  # try to serve another stage with the same signature
    forged = base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()
    with pytest.raises(AccessTokenError, match="signature"):
        verify_access_token(f"{prefix}.{forged}.{signature}", key.public_key(), NOW)


@pytest.mark.parametrize("token", ["", "abc", "agora-access-v1.x", "other-v1.a.b", "agora-access-v1.a.!!!", "agora-access-v1.é.AAAA"])
def test_malformed_tokens_raise_access_token_error(key, token):
    with pytest.raises(AccessTokenError):
        verify_access_token(token, key.public_key(), NOW)


def test_bad_coordinator_key_is_reported(key):
    with pytest.raises(AccessTokenError, match="public key"):
        verify_access_token(issue_access_token(claims(), key), "short", NOW)


def test_access_module_does_not_import_the_application():
    code = "import sys, agora_server.access; print([m for m in sys.modules if m == 'agora' or m.startswith('agora.')])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
