"""Access tokens: the coordinator's signed statement that a peer may serve a stage until a deadline.

The coordinator issues them; every peer checks them (DHT records, stage RPCs, averaging) with
the coordinator's public key alone, so this module depends on nothing but ``cryptography`` and
must never import the ``agora`` application.

Format (all ASCII, safe in HTTP headers and DHT values)::

    agora-access-v1.<base64url(claims JSON)>.<base64url(Ed25519 signature)>

The signature covers the exact bytes of the claims part as it appears in the token (the
base64url text), so nobody has to re-serialise JSON identically to check it.
Claims: ``peer_id`` (base58 libp2p id), ``stage``, ``username``, ``uid``, ``issued_at`` and
``expires_at`` (unix seconds), ``role`` (``worker`` serves ``stage``; ``trainer`` calls every stage)
and ``public_key`` (the peer's libp2p public key protobuf, base64, which signs its DHT records).
Unknown extra claims are tolerated so older peers can check tokens from a newer coordinator.

A token is public (it travels in every DHT record its holder writes); what makes it useless to
anyone else is that it names one peer id, which the transport authenticates, and one public key,
which must have signed each record.
"""

from __future__ import annotations

import base64
import binascii
import collections
import dataclasses
import json
import threading
import time
from collections.abc import Callable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agora_server.peer_keys import WorkerIdentity

PREFIX = "agora-access-v1"
WORKER, TRAINER = "worker", "trainer"


class AccessTokenError(ValueError):
    """An access token that must not be honoured; the message says why."""


@dataclasses.dataclass(frozen=True)
class AccessClaims:
    peer_id: str
    stage: str
    username: str
    uid: str
    issued_at: float
    expires_at: float
    role: str = WORKER
    public_key: str = ""


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def encode_public_key(key: Ed25519PublicKey) -> str:
    """The coordinator public key as it travels in answers and configs: base64url of the 32 raw bytes."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return _b64encode(key.public_bytes(Encoding.Raw, PublicFormat.Raw))


def decode_public_key(key: str | bytes | Ed25519PublicKey) -> Ed25519PublicKey:
    if isinstance(key, Ed25519PublicKey):
        return key
    try:
        raw = key if isinstance(key, bytes) else _b64decode(key)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (ValueError, binascii.Error) as e:
        raise AccessTokenError("the coordinator public key is not a 32-byte Ed25519 key in base64url") from e


def issue_access_token(claims: AccessClaims, private_key: Ed25519PrivateKey) -> str:
    body = _b64encode(json.dumps(dataclasses.asdict(claims), sort_keys=True, separators=(",", ":")).encode())
    signature = private_key.sign(f"{PREFIX}.{body}".encode("ascii"))
    return f"{PREFIX}.{body}.{_b64encode(signature)}"


def verify_access_token(token: str, coordinator_public_key: str | bytes | Ed25519PublicKey, now: float) -> AccessClaims:
    """The token's claims if the coordinator signed it and it has not expired at ``now``; else AccessTokenError."""
    return _check_expiry(_signed_claims(token, decode_public_key(coordinator_public_key)), now)


def _check_expiry(claims: AccessClaims, now: float) -> AccessClaims:
    if now >= claims.expires_at:
        raise AccessTokenError(f"access token for peer {claims.peer_id} expired {now - claims.expires_at:.0f}s ago")
    return claims


def _signed_claims(token: str, public_key: Ed25519PublicKey) -> AccessClaims:
    if not isinstance(token, str):
        raise AccessTokenError("malformed access token: expected a string")
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != PREFIX:
        raise AccessTokenError(f"malformed access token: expected {PREFIX}.<claims>.<signature>")
    try:
        signature = _b64decode(parts[2])
    except (ValueError, binascii.Error) as e:
        raise AccessTokenError("malformed access token: the signature is not base64url") from e
    try:
        public_key.verify(signature, f"{parts[0]}.{parts[1]}".encode("ascii"))
    except (InvalidSignature, UnicodeEncodeError):
        raise AccessTokenError("access token signature does not match the coordinator key") from None
    return _parse_claims(parts[1])


def _parse_claims(body: str) -> AccessClaims:
    # only reached after a valid signature, so a failure here means a coordinator bug, still reported clearly
    try:
        data = json.loads(_b64decode(body))
        return AccessClaims(
            peer_id=str(data["peer_id"]),
            stage=str(data["stage"]),
            username=str(data["username"]),
            uid=str(data["uid"]),
            issued_at=float(data["issued_at"]),
            expires_at=float(data["expires_at"]),
            role=str(data.get("role", WORKER)),
            public_key=str(data.get("public_key", "")),
        )
    except (ValueError, KeyError, TypeError, binascii.Error) as e:
        raise AccessTokenError(f"malformed access token claims: {e}") from e


class AccessGuard:
    """Checks the access other peers present: signed by the coordinator, unexpired, issued to the very
    peer presenting it (the transport authenticates peer ids), for the role and stage asked for.

    Signatures are checked once per token; expiry at every check, so a token the coordinator stops
    renewing (node stopped, revoked, or simply gone) is refused from the moment it runs out."""

    def __init__(self, coordinator_public_key: str | bytes | Ed25519PublicKey, clock: Callable[[], float] = time.time, cache_size: int = 4096):
        self.public_key, self.clock, self.cache_size = decode_public_key(coordinator_public_key), clock, cache_size
        self._verified: collections.OrderedDict[str, AccessClaims] = collections.OrderedDict()
        self._lock = threading.Lock()

    def claims(self, token: str) -> AccessClaims:
        """The claims of a coordinator-signed, unexpired token; else AccessTokenError."""
        with self._lock:
            claims = self._verified.get(token)
            if claims is not None:
                self._verified.move_to_end(token)
        if claims is None:
            claims = _signed_claims(token, self.public_key)
            with self._lock:
                self._verified[token] = claims
                while len(self._verified) > self.cache_size:
                    self._verified.popitem(last=False)
        return _check_expiry(claims, self.clock())

    def check(self, token: str | None, peer_id: str, *, role: str, stage: str | None = None) -> AccessClaims:
        if not token:
            raise AccessTokenError(f"peer {peer_id} presented no access token: it was not admitted by the run's coordinator")
        claims = self.claims(token)
        if claims.peer_id != peer_id:
            raise AccessTokenError(f"the access token was issued to peer {claims.peer_id}, not to {peer_id}")
        if claims.role != role:
            raise AccessTokenError(f"peer {peer_id} has {claims.role} access; this needs {role} access")
        if stage is not None and claims.stage != stage:
            raise AccessTokenError(f"peer {peer_id} has access to stage {claims.stage!r}, not {stage!r}")
        return claims


class PeerAccess:
    """This peer's side: its own current token (renewed by the coordinator session, read by everything
    that presents it) and the guard that checks everyone else's."""

    def __init__(self, token: str, coordinator_public_key: str | bytes | Ed25519PublicKey,
                 identity: "WorkerIdentity | None" = None):
        """``identity``: the key this peer's token names; it also signs the peer's stage progress record,
        which the run's DHT accepts only from the peer the token names."""
        self.guard = AccessGuard(coordinator_public_key)
        self.identity = identity
        self._token = token
        self._listeners: list[Callable[[str], None]] = []

    @property
    def token(self) -> str:
        return self._token

    def on_renew(self, listener: Callable[[str], None]) -> None:
        self._listeners.append(listener)

    def renew(self, token: str) -> None:
        if token == self._token:
            return
        self._token = token
        for listener in self._listeners:
            listener(token)
