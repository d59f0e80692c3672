"""Who may replace or fetch a stage's checkpoint."""

from __future__ import annotations

from typing import Callable

from sqlalchemy import select

from agora_server.access import PREFIX as ACCESS_TOKEN_PREFIX
from agora_server.access import AccessTokenError, verify_access_token

from agora.coordinator.callers import Callers
from agora.coordinator.checkpoints import Uploader
from agora.coordinator.db import ActiveNode, QueueRequest, User
from agora.coordinator.errors import CoordinatorRefusal, Refusal
from agora.coordinator.ledger import Ledger
from agora.coordinator.queue import QueueStatus
from agora.coordinator.stages import StagePlan


class CheckpointAccess:
    def __init__(self, stages: StagePlan, ledger: Ledger, callers: Callers, coordinator_public_key: str,
                 clock: Callable[[], float]):
        self.stages, self._ledger, self._callers = stages, ledger, callers
        self._public_key, self._clock = coordinator_public_key, clock

    def authorize_upload(self, access_token: str | None, stage: str) -> Uploader:
        """Who may replace ``stage``'s checkpoint: a node holding unexpired access to that very stage."""
        if stage not in self.stages:
            raise CoordinatorRefusal(Refusal.UNKNOWN_STAGE, stage=stage)
        if not access_token:
            raise CoordinatorRefusal(Refusal.NO_ACCESS_TOKEN)
        try:
            claims = verify_access_token(access_token, self._public_key, now=self._clock())
        except AccessTokenError as e:
            raise CoordinatorRefusal(Refusal.BAD_ACCESS_TOKEN, reason=str(e)) from None
        if claims.stage != stage:
            raise CoordinatorRefusal(Refusal.WRONG_STAGE, token_stage=claims.stage, stage=stage)
        # the signature alone outlives a move to another stage or a lapse; the database knows better
        with self._ledger.transaction() as s:
            node = s.get(ActiveNode, claims.uid)
            if node is None or node.peer_id != claims.peer_id or node.stage != stage or node.expires_at <= self._clock():
                raise CoordinatorRefusal(Refusal.ACCESS_WITHDRAWN, stage=stage)
        return Uploader(username=claims.username, peer_id=claims.peer_id)

    def authorize_download(self, token: str | None, stage: str) -> None:
        """Who may download ``stage``'s checkpoint (the stage's weights and optimizer state, and the
        uploader's counters that ride along in it): a node holding access to that stage (its access
        token), an account with a node queued for or serving that stage (its participant token, the
        download a queued node makes while it waits), or an operator. Nobody else, strangers least."""
        if stage not in self.stages:
            raise CoordinatorRefusal(Refusal.UNKNOWN_STAGE, stage=stage)
        if not token:
            raise CoordinatorRefusal(Refusal.DOWNLOAD_NEEDS_TOKEN)
        if token.startswith(f"{ACCESS_TOKEN_PREFIX}."):  # never sent on to Hugging Face
            self.authorize_upload(token, stage)
            return
        username = self._callers.username(token)
        if self._callers.is_operator(username):
            return
        with self._ledger.transaction() as s:
            user = s.scalar(select(User).where(User.username == username))
            if user is None:
                raise CoordinatorRefusal(Refusal.NOT_ON_STAGE, stage=stage)
            now = self._clock()
            serving = s.scalar(select(ActiveNode.uid).where(ActiveNode.user_id == user.id, ActiveNode.stage == stage,
                                                             ActiveNode.expires_at > now).limit(1))
            waiting = s.scalar(select(QueueRequest.seq).where(QueueRequest.user_id == user.id, QueueRequest.stage == stage,
                                                              QueueRequest.status == QueueStatus.WAITING).limit(1))
            if serving is None and waiting is None:
                raise CoordinatorRefusal(Refusal.NOT_ON_STAGE, stage=stage)
