"""Peer identity keys as hivemind makes them, read and checked without importing hivemind.

``P2P.generate_identity`` writes a libp2p ``PrivateKey`` protobuf (key_type RSA, data = the
RSA-2048 key in PKCS#1 DER). The peer id is the sha2-256 multihash of the matching libp2p
``PublicKey`` protobuf (key_type RSA, data = SubjectPublicKeyInfo DER), in base58. A worker sends
that public-key protobuf at join; the coordinator checks that it hashes to the claimed peer id,
verifies heartbeats with it and writes it into the access token, so every peer can check the
records a token holder signs (``dht_access``). Signatures are RSA-PSS/SHA-256 with the longest salt, as
``hivemind.utils.crypto.RSAPrivateKey.sign`` makes them (raw bytes here, not base64).

Two-field protobufs are encoded by hand: importing hivemind's generated classes would load
torch into the coordinator.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import base58
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

_KEY_TYPE_RSA = 0
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)
_SHA256_MULTIHASH_PREFIX = bytes([0x12, 0x20])
MAX_PUBLIC_KEY_BYTES = 4096


class PeerKeyError(ValueError):
    """A key or signature that cannot be used; the message says why."""


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise PeerKeyError("truncated protobuf varint")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos


def encode_key_protobuf(key_type: int, data: bytes) -> bytes:
    return b"\x08" + _varint(key_type) + b"\x12" + _varint(len(data)) + data


def decode_key_protobuf(blob: bytes) -> tuple[int, bytes]:
    """(key_type, data) of a libp2p PublicKey/PrivateKey protobuf."""
    key_type, data, pos = None, None, 0
    while pos < len(blob):
        tag, pos = _read_varint(blob, pos)
        if tag == 0x08:
            key_type, pos = _read_varint(blob, pos)
        elif tag == 0x12:
            length, pos = _read_varint(blob, pos)
            if pos + length > len(blob):
                raise PeerKeyError("truncated key bytes in protobuf")
            data, pos = blob[pos : pos + length], pos + length
        else:
            raise PeerKeyError(f"unexpected protobuf field tag {tag} in a libp2p key")
    if key_type is None or data is None:
        raise PeerKeyError("a libp2p key protobuf needs both key_type and data")
    return key_type, data


def peer_id_of(public_key_protobuf: bytes) -> str:
    return base58.b58encode(_SHA256_MULTIHASH_PREFIX + hashlib.sha256(public_key_protobuf).digest()).decode()


@functools.lru_cache(maxsize=4096)  # every DHT read checks record signatures with the same few keys
def load_public_key(public_key_protobuf: bytes) -> rsa.RSAPublicKey:
    if len(public_key_protobuf) > MAX_PUBLIC_KEY_BYTES:
        raise PeerKeyError("public key is too large")
    key_type, data = decode_key_protobuf(public_key_protobuf)
    if key_type != _KEY_TYPE_RSA:
        raise PeerKeyError(f"only RSA libp2p keys are accepted (hivemind's kind), got key type {key_type}")
    try:
        key = serialization.load_der_public_key(data)
    except ValueError as e:
        raise PeerKeyError("public key bytes are not a DER SubjectPublicKeyInfo") from e
    if not isinstance(key, rsa.RSAPublicKey) or key.key_size < 2048:
        raise PeerKeyError("public key must be RSA with at least 2048 bits")
    return key


def owner_marker(public_key_protobuf: bytes) -> bytes:
    """How hivemind names the owner of a protected DHT record signed by this key: ``[owner:<OpenSSH key>]``."""
    ssh = load_public_key(public_key_protobuf).public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return b"[owner:" + ssh + b"]"


def verify_signature(public_key_protobuf: bytes, data: bytes, signature: bytes) -> bool:
    try:
        load_public_key(public_key_protobuf).verify(signature, data, _PSS, hashes.SHA256())
        return True
    except (InvalidSignature, ValueError):
        return False


class WorkerIdentity:
    """A peer's own side: its identity file, what it sends at join, how it signs heartbeats and DHT records."""

    def __init__(self, private_key: rsa.RSAPrivateKey):
        self._key = private_key
        spki = private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.public_key_protobuf = encode_key_protobuf(_KEY_TYPE_RSA, spki)
        self.peer_id = peer_id_of(self.public_key_protobuf)

    @classmethod
    def load(cls, path: str | Path) -> "WorkerIdentity":
        key_type, data = decode_key_protobuf(Path(path).read_bytes())
        if key_type != _KEY_TYPE_RSA:
            raise PeerKeyError(f"{path}: only RSA identities are supported, got key type {key_type}")
        key = serialization.load_der_private_key(data, password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise PeerKeyError(f"{path}: not an RSA private key")
        return cls(key)

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data, _PSS, hashes.SHA256())

    def hivemind_key(self):
        """This identity as the key hivemind signs owned DHT records with (a stage's progress record):
        records that name their owner then name this very peer, which the run's DHT checks."""
        from hivemind.utils.crypto import RSAPrivateKey  # only peers that run a DHT need hivemind

        key = RSAPrivateKey.__new__(RSAPrivateKey)
        key.__setstate__({"_private_key": self._key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption())})
        return key
