"""Who is calling: turn a participant's Bearer token into a username.

- ``HuggingFaceVerifier``  production: Hugging Face ``whoami`` through huggingface_hub
- ``TokenFileVerifier``    offline and local runs: a file of ``<sha256 of token> <username>`` lines
- ``CachingVerifier``      remembers checks for a while, refusals too (``whoami`` is rate-limited)
- ``NewTokenBudget``       how many tokens the verifier does not remember one address may have checked a minute

Tokens are secrets: nothing here logs them or puts them in an exception message.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Callable, Protocol

TOKEN_FILE_MODE = 0o600


class InvalidToken(Exception):
    """The token does not identify anyone."""


class TokenServiceUnavailable(Exception):
    """The token could not be checked right now (e.g. Hugging Face unreachable); retry later."""


class TokenVerifier(Protocol):
    def username(self, token: str) -> str:
        """The account the token belongs to; InvalidToken or TokenServiceUnavailable otherwise."""
        ...

    def remembers(self, token: str) -> bool:
        """Whether checking the token costs no call to an outside service (it is remembered, or checked locally)."""
        ...


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class HuggingFaceVerifier:
    def __init__(self, endpoint: str | None = None):
        from huggingface_hub import HfApi

        self._api = HfApi(endpoint=endpoint)

    def username(self, token: str) -> str:
        from huggingface_hub.errors import HfHubHTTPError

        try:
            info = self._api.whoami(token=token)
        except HfHubHTTPError as e:
            status = e.response.status_code if e.response is not None else None
            if status in (401, 403):
                raise InvalidToken() from None
            raise TokenServiceUnavailable(f"Hugging Face answered {status} to the token check") from None
        except Exception as e:  # network failures surface as the HTTP client's own exception types
            raise TokenServiceUnavailable(f"Hugging Face could not be reached for the token check ({type(e).__name__})") from None
        name = info.get("name") if isinstance(info, dict) else None
        if not isinstance(name, str) or not name:
            raise InvalidToken()
        return name

    def remembers(self, token: str) -> bool:
        return False


class TokenFileVerifier:
    """Reads the file on every check, so tokens can be added while the coordinator runs."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def username(self, token: str) -> str:
        digest = token_digest(token)
        for known, name in read_token_file(self.path).items():
            if hmac.compare_digest(known, digest):
                return name
        raise InvalidToken()

    def remembers(self, token: str) -> bool:
        return True


def read_token_file(path: Path) -> dict[str, str]:
    """digest → username; blank lines and ``#`` comments are skipped."""
    entries = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2 or len(parts[0]) != 64:
            raise ValueError(f"{path}:{number}: expected '<sha256 hex of token> <username>'")
        entries[parts[0].lower()] = parts[1]
    return entries


def add_token(path: str | Path, username: str, token: str | None = None) -> str:
    """Append a token for ``username`` (a fresh random one if none is given) and return it.

    The file is created with mode 0600 and only ever holds digests.
    """
    if not username or any(c.isspace() for c in username):
        raise ValueError("a username must be non-empty and contain no whitespace")
    token = token or f"agora_{secrets.token_urlsafe(32)}"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, TOKEN_FILE_MODE)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(f"{token_digest(token)} {username}\n")
    os.chmod(path, TOKEN_FILE_MODE)
    return token


class CachingVerifier:
    """Successful checks are reused for ``ttl_s``, refused tokens are refused again for ``failure_ttl_s``
    without asking: a stranger repeating a bad token cannot spend the ``whoami`` rate limit. A check
    that could not be made (TokenServiceUnavailable) is not remembered. At most ``max_entries`` tokens
    are remembered, the oldest forgotten first, so many random tokens cannot grow memory."""

    def __init__(self, inner: TokenVerifier, ttl_s: float, clock: Callable[[], float] = time.monotonic, *,
                 failure_ttl_s: float = 60.0, max_entries: int = 100_000):
        self._inner, self._ttl, self._failure_ttl, self._clock = inner, ttl_s, failure_ttl_s, clock
        self._max_entries = max_entries
        # digest → (username, or None for a refused token; until when); never the token itself
        self._cache: collections.OrderedDict[str, tuple[str | None, float]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def username(self, token: str) -> str:
        digest = token_digest(token)
        now = self._clock()
        with self._lock:
            hit = self._cache.get(digest)
            if hit is not None and hit[1] > now:
                if hit[0] is None:
                    raise InvalidToken()
                return hit[0]
        try:
            name = self._inner.username(token)
        except InvalidToken:
            self._remember(digest, None, now + self._failure_ttl)
            raise
        self._remember(digest, name, now + self._ttl)
        return name

    def remembers(self, token: str) -> bool:
        with self._lock:
            hit = self._cache.get(token_digest(token))
        return (hit is not None and hit[1] > self._clock()) or self._inner.remembers(token)

    def _remember(self, digest: str, name: str | None, until: float) -> None:
        with self._lock:
            self._cache[digest] = (name, until)
            self._cache.move_to_end(digest)
            while len(self._cache) > self._max_entries:
                self._cache.popitem(last=False)


class NewTokenBudget:
    """Each address may have ``per_minute`` tokens the verifier does not remember checked in any minute.
    Remembered refusals stop a stranger who repeats a token; this stops one who makes up a new token
    for every request, each of which would cost a Hugging Face ``whoami`` call. At most ``max_addresses``
    addresses are tracked (the least recently seen forgotten first), so many addresses cannot grow memory."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic, max_addresses: int = 100_000):
        self._per_minute, self._clock, self._max_addresses = per_minute, clock, max_addresses
        self._checks: collections.OrderedDict[str, collections.deque[float]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def spend(self, address: str) -> bool:
        """Count one check for ``address``; False (nothing counted) when its minute's budget is spent."""
        now = self._clock()
        with self._lock:
            checks = self._checks.setdefault(address, collections.deque())
            self._checks.move_to_end(address)
            while checks and checks[0] <= now - 60:
                checks.popleft()
            if len(checks) >= self._per_minute:
                return False
            checks.append(now)
            while len(self._checks) > self._max_addresses:
                self._checks.popitem(last=False)
            return True


def build_verifier(token_source: str | Path, cache_s: float, failure_cache_s: float = 60.0) -> TokenVerifier:
    if str(token_source) != "hf":
        return TokenFileVerifier(token_source)  # cheap to read, and a removed line takes effect at once
    return CachingVerifier(HuggingFaceVerifier(), cache_s, failure_ttl_s=failure_cache_s)
