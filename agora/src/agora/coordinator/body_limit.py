"""A request body limit counted while the body streams in, before any route, token or JSON parsing.

A declared ``Content-Length`` over the limit is refused before a byte of the body is read; a body
without one (chunked) is refused as soon as the bytes received pass the limit, so what a caller can
make the coordinator hold is the limit, not what it sends. Checkpoint uploads, streamed to disk by
``CheckpointStore`` only after the uploader's access is checked, have a limit of their own.
"""

from __future__ import annotations

from typing import Callable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(HTTPException):
    """Raised from the body's receive: the route's body parsing passes HTTPExceptions on unchanged."""

    def __init__(self, limit: int):
        super().__init__(status_code=413)
        self.limit = limit


class BodyLimit:
    def __init__(self, app: ASGIApp, limit_for: Callable[[str, str], int], refuse: Callable[[int], object]):
        """``limit_for(method, path)``: the byte limit of that request. ``refuse(limit)``: the ASGI response
        for a body declared over it."""
        self.app, self._limit_for, self._refuse = app, limit_for, refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self._limit_for(scope["method"], scope["path"])
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await self._refuse(limit)(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, counted, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None
