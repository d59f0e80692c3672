"""Signed access: a worker's access to its stage, a trainer's access to every stage, and the check
that a peer's public key is the one its peer id names."""

from __future__ import annotations

import base64
import binascii
import hmac
from typing import Callable

from sqlalchemy.orm import Session

from agora_server.access import TRAINER, WORKER, AccessClaims
from agora_server.peer_keys import PeerKeyError, load_public_key, peer_id_of

from agora.coordinator.config import CoordinatorConfig
from agora.coordinator.db import ActiveNode, IdentityBinding, User
from agora.coordinator.errors import CoordinatorRefusal, Refusal
from agora.protocol import AccessAnswer, TrainerAccessRequest
from agora.coordinator.signing import AccessSigner


def check_public_key(peer_id: str, public_key: str) -> str:
    """The key in canonical base64 if it is a valid key whose hash is ``peer_id``; a refusal otherwise."""
    try:
        raw = base64.b64decode(public_key, validate=True)
        load_public_key(raw)
    except (binascii.Error, ValueError) as e:
        reason = str(e) if isinstance(e, PeerKeyError) else "not base64"
        raise CoordinatorRefusal(Refusal.BAD_PUBLIC_KEY, reason=reason) from None
    if not hmac.compare_digest(peer_id_of(raw), peer_id):
        raise CoordinatorRefusal(Refusal.KEY_MISMATCH)
    return base64.b64encode(raw).decode("ascii")


class AccessGrants:
    def __init__(self, config: CoordinatorConfig, signer: AccessSigner, clock: Callable[[], float]):
        self.config, self.signer, self._clock = config, signer, clock

    def worker(self, s: Session, node: ActiveNode, user: User, base_url: str | None = None) -> AccessAnswer:
        public_key = s.get(IdentityBinding, node.peer_id).public_key
        claims = AccessClaims(peer_id=node.peer_id, stage=node.stage, username=user.username, uid=node.uid,
                              issued_at=self._clock(), expires_at=node.expires_at, role=WORKER, public_key=public_key)
        return self._grant(claims, self.config.checkpoint_url(node.stage, base_url), base_url)

    def trainer(self, username: str, body: TrainerAccessRequest) -> AccessAnswer:
        """Access to call every stage; trainers take no place in the queue and report no contribution:
        they are the run's own machinery."""
        public_key = check_public_key(body.peer_id, body.public_key)
        now = self._clock()
        claims = AccessClaims(peer_id=body.peer_id, stage="", username=username, uid=f"trainer-{body.peer_id[-12:]}",
                              issued_at=now, expires_at=now + self.config.access_token_lifetime_s, role=TRAINER,
                              public_key=public_key)
        return self._grant(claims, checkpoint_url=None)

    def _grant(self, claims: AccessClaims, checkpoint_url: str | None, base_url: str | None = None) -> AccessAnswer:
        node = claims.peer_id if claims.role == WORKER else None
        return AccessAnswer(stage=claims.stage, uid=claims.uid, username=claims.username, peer_id=claims.peer_id,
                            access_token=self.signer.issue(claims), expires_at=claims.expires_at,
                            checkpoint_url=checkpoint_url, coordinator_public_key=self.signer.public_key,
                            dashboard_url=self.config.dashboard_url(node, base_url))
