"""Who is calling: the participant's token → a username, or a refusal."""

from __future__ import annotations

from typing import Sequence

from agora.coordinator.errors import CoordinatorRefusal, Refusal
from agora.coordinator.tokens import InvalidToken, TokenServiceUnavailable, TokenVerifier


class Callers:
    def __init__(self, verifier: TokenVerifier, operators: Sequence[str]):
        self.verifier, self._operators = verifier, operators

    def username(self, token: str | None) -> str:
        if not token:
            raise CoordinatorRefusal(Refusal.INVALID_TOKEN)
        try:
            return self.verifier.username(token)
        except InvalidToken:
            raise CoordinatorRefusal(Refusal.INVALID_TOKEN) from None
        except TokenServiceUnavailable:
            raise CoordinatorRefusal(Refusal.TOKEN_SERVICE_DOWN) from None

    def is_operator(self, username: str) -> bool:
        return username in self._operators

    def operator(self, token: str | None) -> str:
        """The caller's username if it is one of the run's operators; NOT_OPERATOR otherwise."""
        username = self.username(token)
        if not self.is_operator(username):
            raise CoordinatorRefusal(Refusal.NOT_OPERATOR)
        return username
