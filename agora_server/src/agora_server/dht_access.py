"""The run's DHT admits only records written by peers the coordinator admitted.

Every record a peer stores carries the peer's access token and the peer's own signature (its libp2p
identity key, whose public half the token names) over key, subkey, value, expiry and token. Every
peer and seed refuses to store a record that fails the check and drops one that fails when read,
so an unadmitted peer can neither announce itself, nor report progress, nor declare itself for
averaging. A failing record is dropped alone: the other records under its key stay readable. Copying a token out of someone else's record does not help: the signature must come
from the key the token names. A record may not outlive its token by more than ``grace`` seconds.

A stage's own keys (its announcements, its progress, its averaging groups) are stricter: only a
worker admitted to that stage may write there, and only under its own peer id as subkey.

Peers of a worker also run hivemind's own validators (the progress tracker's schema and signature
checks); this one wraps them all: it signs last and checks first.
"""

from __future__ import annotations

import base64
import binascii
import functools
import logging
import struct
import time
from collections.abc import Callable, Iterable
from typing import Any

import base58
from hivemind import DHT
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils.serializer import MSGPackSerializer

from agora_server.access import WORKER, AccessGuard, AccessTokenError
from agora_server.optim.averaging import AveragingConfig, averaging_keys
from agora_server.optim.progress import progress_key
from agora_server.peer_keys import PeerKeyError, WorkerIdentity, owner_marker, peer_id_of, verify_signature
from agora_server.wire import stage_key

logger = logging.getLogger(__name__)

_MARK = b"[agora-access:"
_SEPARATOR = b"|"


class AccessRecordValidator(RecordValidatorBase):
    def __init__(
        self,
        coordinator_public_key: str,
        stage_keys: dict[str, str],
        *,
        identity: WorkerIdentity | None = None,
        token: str | None = None,
        grace: float = 60.0,
        clock: Callable[[], float] = time.time,
    ):
        """``stage_keys``: DHT key → stage name for every key a stage's workers write. ``identity`` and
        ``token``: what this peer signs its own records with; a seed, which stores nothing of its
        own, has neither."""
        self.guard = AccessGuard(coordinator_public_key, clock=clock)
        keep_valid_subkeys_only()
        self._stage_of_key = {DHTID.generate(source=key).to_bytes(): stage for key, stage in stage_keys.items()}
        self.identity, self.token, self.grace = identity, token, grace

    @classmethod
    def for_run(cls, run: str, stages: Iterable[str], averaging: AveragingConfig, coordinator_public_key: str, **kwargs) -> "AccessRecordValidator":
        keys = {}
        for stage in stages:
            prefix = stage_key(run, stage)  # also the prefix of the stage's averager
            for key in (prefix, progress_key(run, stage), *averaging_keys(prefix, averaging)):
                keys[key] = stage
        return cls(coordinator_public_key, keys, **kwargs)

    @property
    def priority(self) -> int:
        return 20  # above hivemind's RSASignatureValidator (10): sign last, check and strip first

    def sign_value(self, record: DHTRecord) -> bytes:
        if self.identity is None or self.token is None:
            return record.value  # unsigned: every validating peer will refuse it, which is the point
        token = self.token.encode("ascii")
        signature = self.identity.sign(_signed_bytes(record, record.value, token))
        return record.value + _MARK + token + _SEPARATOR + base64.b64encode(signature) + b"]"

    def validate(self, record: DHTRecord) -> bool:
        try:
            self._check(record)
            return True
        except (AccessTokenError, PeerKeyError, ValueError) as e:
            logger.debug("refused a DHT record: %s", e)
            return False

    def strip_value(self, record: DHTRecord) -> bytes:
        return _split(record.value)[0]

    def _check(self, record: DHTRecord) -> None:
        value, token, signature = _split(record.value)
        claims = self.guard.claims(token.decode("ascii"))
        if record.expiration_time > claims.expires_at + self.grace:
            raise ValueError(f"the record outlives its writer's access token ({claims.peer_id})")
        public_key = _named_key(claims.public_key, claims.peer_id)
        if not verify_signature(public_key, _signed_bytes(record, value, token), signature):
            raise ValueError(f"the record is not signed by {claims.peer_id}, whose token it carries")
        stage = self._stage_of_key.get(record.key)
        if stage is not None:
            if claims.role != WORKER or claims.stage != stage:
                raise ValueError(f"{claims.peer_id} may not write stage {stage!r}'s records ({claims.role} of {claims.stage!r})")
            if not _own_subkey(record.subkey, claims.peer_id, claims.public_key):
                raise ValueError(f"{claims.peer_id} may write stage {stage!r}'s records only under its own peer id")

    @staticmethod
    def renew_in(dht: DHT, token: str) -> None:
        """Sign this peer's records with ``token`` from now on; the validator lives in the DHT's process."""
        dht.run_coroutine(functools.partial(_renew, token))


async def _renew(token: str, dht: DHT, _node) -> None:
    validators: Iterable[RecordValidatorBase] = getattr(dht._record_validator, "_validators", [])  # hivemind's CompositeValidator
    for validator in validators:
        if isinstance(validator, AccessRecordValidator):
            validator.token = token


def keep_valid_subkeys_only() -> None:
    """Make this process's DHT drop the failing records of a dictionary value (a stage's announcements,
    its progress) instead of refusing the whole value. hivemind refuses it whole, so the record of one
    worker whose access lapsed hid every live record under that key until it expired (33 s were seen).
    Takes effect for the DHTs started after it (their processes are forked from this one)."""
    if getattr(DHTProtocol._validate_dictionary, "keeps_valid_subkeys", False):
        return

    def validate_dictionary(protocol: DHTProtocol, key_bytes: bytes, dictionary: Any) -> bool:
        validator = protocol.record_validator
        if validator is None:
            return True
        with dictionary.freeze():
            failing = [subkey for subkey, (value, expiration_time) in dictionary.items()
                       if not validator.validate(DHTRecord(key_bytes, protocol.serializer.dumps(subkey), value, expiration_time))]
        for subkey in failing:
            del dictionary[subkey]
        return not failing or len(dictionary) > 0  # nothing valid left: refused, as hivemind would

    validate_dictionary.keeps_valid_subkeys = True
    DHTProtocol._validate_dictionary = validate_dictionary


def _own_subkey(subkey: bytes, peer_id: str, public_key_b64: str) -> bool:
    # announcements name the peer in base58, averaging records in raw bytes; progress records name
    # their owner the way hivemind's RSASignatureValidator does, and that owner must be this very peer
    if subkey in (MSGPackSerializer.dumps(peer_id), MSGPackSerializer.dumps(base58.b58decode(peer_id))):
        return True
    return subkey == _owner_subkey(public_key_b64)


@functools.lru_cache(maxsize=4096)
def _owner_subkey(public_key_b64: str) -> bytes:
    return MSGPackSerializer.dumps(owner_marker(base64.b64decode(public_key_b64, validate=True)))


@functools.lru_cache(maxsize=4096)
def _named_key(public_key_b64: str, peer_id: str) -> bytes:
    """The public key a token names, checked once against the token's peer id (tokens repeat in every
    record their holder writes; checks repeat on every read)."""
    public_key = base64.b64decode(public_key_b64, validate=True)
    if not public_key or peer_id_of(public_key) != peer_id:
        raise ValueError(f"the access token of {peer_id} names no usable public key")
    return public_key


def _signed_bytes(record: DHTRecord, value: bytes, token: bytes) -> bytes:
    fields = (record.key, record.subkey, value, token)
    return b"agora-dht-record-v1" + b"".join(struct.pack(">I", len(f)) + f for f in fields) + struct.pack(">d", record.expiration_time)


def _split(signed: bytes) -> tuple[bytes, bytes, bytes]:
    """(value, token, signature) of a signed record value; ValueError if it carries no access."""
    start = signed.rfind(_MARK)
    if start < 0 or not signed.endswith(b"]"):
        raise ValueError("the record carries no access token: its writer was not admitted")
    token, separator, signature = signed[start + len(_MARK) : -1].partition(_SEPARATOR)
    if not separator:
        raise ValueError("malformed access mark on the record")
    try:
        return signed[:start], token, base64.b64decode(signature, validate=True)
    except binascii.Error:
        raise ValueError("the record's signature is not base64") from None

