"""The coordinator's HTTP face: FastAPI routes that hand each call to ``Coordinator``.

``create_app(config)`` builds everything from the config; tests and the local swarm may pass
their own token verifier, port probe or clock. The OpenAPI spec is at ``/openapi.json``.
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from typing import Callable

from fastapi import Depends, FastAPI, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from agora.coordinator import porttest
from agora.coordinator.config import CoordinatorConfig
from agora.coordinator.db import Database
from agora.coordinator.errors import CoordinatorRefusal
from agora.coordinator.schemas import (
    AccessAnswer,
    ContributionInfo,
    ErrorAnswer,
    HeartbeatAnswer,
    HeartbeatRequest,
    JoinAnswer,
    JoinRequest,
    RefreshRequest,
    RunInfo,
    StatusRequest,
)
from agora.coordinator.service import Coordinator, PortProbe
from agora.coordinator.signing import AccessSigner, load_or_create_key
from agora.coordinator.tokens import TokenVerifier, build_verifier

_bearer = HTTPBearer(auto_error=False, description="The participant's Hugging Face token (or a token from the run's token file).")
_REFUSALS = {status: {"model": ErrorAnswer} for status in (400, 401, 403, 404, 409, 410, 429, 503)}


def _token(credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> str | None:
    return credentials.credentials if credentials else None


def _source_ip(request: Request) -> str:
    return request.client.host if request.client else ""


def create_app(config: CoordinatorConfig, *, verifier: TokenVerifier | None = None, probe: PortProbe | None = None,
               clock: Callable[[], float] = time.time) -> FastAPI:
    db = Database(config.database_url)
    coordinator = Coordinator(
        config, db, verifier or build_verifier(config.token_source, config.token_cache_s),
        AccessSigner(load_or_create_key(config.key_path)), probe or porttest.probe, clock,
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        try:
            yield
        finally:
            db.close()

    app = FastAPI(title=f"Agora coordinator ({config.run_name})", version="1", lifespan=lifespan,
                  description="Admission, stage assignment and signed access for one Agora run.")
    app.state.coordinator = coordinator

    @app.exception_handler(CoordinatorRefusal)
    async def _refused(_request: Request, exc: CoordinatorRefusal) -> JSONResponse:
        return JSONResponse(status_code=exc.refusal.status, content={"detail": exc.message, "error": exc.code})

    @app.put("/api/join", response_model=JoinAnswer, responses=_REFUSALS)
    def join(body: JoinRequest, request: Request, token: str | None = Depends(_token)):
        """Ask to serve in the run. The coordinator first connects back to announce_ip:announce_port."""
        return coordinator.join(token, body, _source_ip(request))

    @app.put("/api/authorization_status", response_model=JoinAnswer, responses=_REFUSALS)
    def authorization_status(body: StatusRequest, token: str | None = Depends(_token)):
        """Poll a queued join; also reports how far the node's weight download has come."""
        return coordinator.authorization_status(token, body)

    @app.put("/api/refresh_token", response_model=AccessAnswer, responses=_REFUSALS)
    def refresh_token(body: RefreshRequest, token: str | None = Depends(_token)):
        """Extend a node's access before it expires."""
        return coordinator.refresh(token, body)

    @app.put("/api/heartbeat", response_model=HeartbeatAnswer, responses=_REFUSALS)
    async def heartbeat(body: HeartbeatRequest, request: Request, token: str | None = Depends(_token),
                        signature: str = Header(alias="X-Agora-Signature", max_length=2048,
                                                description="base64 RSA-PSS/SHA-256 signature of the body bytes")):
        """Report the node's counters; the answer may move the node to another stage."""
        raw = await request.body()  # the signature covers these exact bytes, not a re-serialisation
        return await run_in_threadpool(coordinator.heartbeat, token, raw, body, signature)

    @app.get("/api/run_info", response_model=RunInfo)
    def run_info():
        """Stages and their workers, queue length and the wait a node joining now can expect."""
        return coordinator.run_info()

    @app.get("/api/contributions", response_model=list[ContributionInfo])
    def contributions():
        """What each participant's node has done, per stage."""
        return coordinator.contributions()

    return app
