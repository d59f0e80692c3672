"""The coordinator's HTTP face: FastAPI routes that hand each call to ``Coordinator``.

``create_app(config)`` builds everything from the config; tests and the local swarm may pass
their own token verifier, port probe or clock. The OpenAPI spec is at ``/openapi.json``, the
dashboard at ``/``, Prometheus metrics at ``/metrics``.
"""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import asynccontextmanager
from importlib import resources
from typing import Callable

from fastapi import Depends, FastAPI, Header, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.requests import ClientDisconnect

from agora_server.caller_text import clip

from agora.coordinator import porttest
from agora.coordinator.body_limit import BodyLimit, BodyTooLarge
from agora.coordinator.checkpoint_check import stage_layouts
from agora.coordinator.checkpoints import CheckpointStore, UploadPart
from agora.coordinator.config import CoordinatorConfig
from agora.coordinator.db import Database
from agora.coordinator.errors import CoordinatorRefusal, Refusal
from agora.coordinator.metrics import CoordinatorMetrics
from agora.protocol import (
    CHECKPOINT_EPOCH_HEADER,
    CHECKPOINT_SHA256_HEADER,
    SIGNATURE_HEADER,
    UPLOAD_ID_HEADER,
    UPLOAD_ID_PATTERN,
    UPLOAD_OFFSET_HEADER,
    UPLOAD_TOTAL_HEADER,
    AccessAnswer,
    CheckpointAnswer,
    ContributionInfo,
    ErrorAnswer,
    HeartbeatAnswer,
    HeartbeatRequest,
    HistoryAnswer,
    JoinAnswer,
    JoinRequest,
    NodeInfo,
    RefreshRequest,
    RunInfo,
    StatusRequest,
    StopNodeAnswer,
    StopNodeRequest,
    TrainerAccessRequest,
    TrainingReport,
    UploadStatus,
    UploadStatusRequest,
)
from agora.coordinator.service import Coordinator, PortProbe
from agora.coordinator.signing import AccessSigner, load_or_create_key
from agora.coordinator.stages import load_run, plan_stages
from agora.coordinator.tokens import NewTokenBudget, TokenVerifier, build_verifier

_bearer = HTTPBearer(auto_error=False, description="The participant's Hugging Face token (or a token from the run's token file).")
_access_bearer = HTTPBearer(auto_error=False, scheme_name="AccessToken",
                            description="The node's access token, as signed by this coordinator.")
_REFUSALS = {status: {"model": ErrorAnswer} for status in (400, 401, 403, 404, 409, 410, 413, 429, 503)}
_STAGE = Path(pattern=r"^[A-Za-z0-9_-]+$", max_length=64)
_OCTETS = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}


def _access_token(credentials: HTTPAuthorizationCredentials | None = Depends(_access_bearer)) -> str | None:
    return credentials.credentials if credentials else None


def _source_ip(request: Request) -> str:
    return request.client.host if request.client else ""


def _content_length(request: Request) -> int | None:
    value = request.headers.get("content-length", "")
    return int(value) if value.isdigit() else None


def create_app(config: CoordinatorConfig, *, verifier: TokenVerifier | None = None, probe: PortProbe | None = None,
               clock: Callable[[], float] = time.time) -> FastAPI:
    run = load_run(config)
    stages = plan_stages(config, run)  # refused here, at start, if the config's stage list disagrees with the run's
    db = Database(config.database_url)
    verifier = verifier or build_verifier(config.token_source, config.token_cache_s, config.token_failure_cache_s)
    coordinator = Coordinator(config, stages, db, verifier, AccessSigner(load_or_create_key(config.key_path)), probe or porttest.probe, clock,
                              data_shards=run.trainer.data_shards)
    new_tokens = NewTokenBudget(config.new_tokens_per_minute, clock)

    def _token(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> str | None:
        token = credentials.credentials if credentials else None
        # before any route checks it: a token the verifier does not remember may cost a whoami call
        if token and not verifier.remembers(token) and not new_tokens.spend(_source_ip(request)):
            raise CoordinatorRefusal(Refusal.TOO_MANY_NEW_TOKENS)
        return token

    async def sample_periodically() -> None:
        while True:
            await asyncio.sleep(config.dashboard.sample_interval_s)
            try:
                await run_in_threadpool(coordinator.sample)
            except Exception:  # a failed sample costs one point of a chart, never the service
                pass

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        sampler = asyncio.create_task(sample_periodically())
        try:
            yield
        finally:
            sampler.cancel()
            db.close()

    app = FastAPI(title=f"Agora coordinator ({config.run_name})", version="1", lifespan=lifespan,
                  description="Admission, stage assignment and signed access for one Agora run.")
    app.state.coordinator = coordinator
    metrics = CoordinatorMetrics(coordinator)
    store = None if config.checkpoints.directory is None else CheckpointStore(
        config.checkpoints.directory, db, config.checkpoints.max_upload_bytes, clock, layouts=stage_layouts(run),
        partial_expiry_s=config.checkpoints.partial_upload_expiry_s)
    dashboard = resources.files("agora.coordinator").joinpath("dashboard.html").read_text(encoding="utf-8")

    @app.exception_handler(CoordinatorRefusal)
    async def _refused(_request: Request, exc: CoordinatorRefusal) -> JSONResponse:
        metrics.refusals.labels(exc.code).inc()
        return JSONResponse(status_code=exc.refusal.status, content={"detail": exc.message, "error": exc.code})

    def _too_large(limit: int) -> JSONResponse:
        refusal = CoordinatorRefusal(Refusal.REQUEST_TOO_LARGE, limit=limit)
        metrics.refusals.labels(refusal.code).inc()
        return JSONResponse(status_code=413, content={"detail": refusal.message, "error": refusal.code},
                            headers={"Connection": "close"})  # the rest of the body is not wanted

    @app.exception_handler(BodyTooLarge)
    async def _body_too_large(_request: Request, exc: BodyTooLarge) -> JSONResponse:
        return _too_large(exc.limit)

    def _body_limit(method: str, path: str) -> int:
        if method == "PUT" and path.startswith("/api/checkpoints/"):
            return config.checkpoints.max_upload_bytes
        return config.max_request_bytes

    # ahead of every route: the limit counts the body's bytes before any route, token check or parsing sees them
    app.add_middleware(BodyLimit, limit_for=_body_limit, refuse=_too_large)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        # pydantic echoes what the caller sent: clipped, so a megabyte field does not come back whole
        errors = [{**error, "input": clip(error.get("input")), "msg": clip(error.get("msg", ""))} for error in exc.errors()]
        return JSONResponse(status_code=422, content={"detail": jsonable_encoder(errors)})

    @app.put("/api/join", response_model=JoinAnswer, responses=_REFUSALS)
    def join(body: JoinRequest, request: Request, token: str | None = Depends(_token)):
        """Ask to serve in the run. The coordinator first connects back to announce_ip:announce_port."""
        return coordinator.join(token, body, _source_ip(request), str(request.base_url))

    @app.put("/api/authorization_status", response_model=JoinAnswer, responses=_REFUSALS)
    def authorization_status(body: StatusRequest, request: Request, token: str | None = Depends(_token)):
        """Poll a queued join; also reports how far the node's weight download has come."""
        return coordinator.authorization_status(token, body, str(request.base_url))

    @app.put("/api/refresh_token", response_model=AccessAnswer, responses=_REFUSALS)
    def refresh_token(body: RefreshRequest, request: Request, token: str | None = Depends(_token)):
        """Extend a node's access before it expires."""
        return coordinator.refresh(token, body, str(request.base_url))

    @app.put("/api/trainer_access", response_model=AccessAnswer, responses=_REFUSALS)
    def trainer_access(body: TrainerAccessRequest, token: str | None = Depends(_token)):
        """Operators only: access for a trainer to call every stage, and its shard of the data (the same
        for its key every time); ask again before it expires to renew it."""
        return coordinator.trainer_access(token, body)

    @app.put("/api/heartbeat", response_model=HeartbeatAnswer, responses=_REFUSALS)
    async def heartbeat(body: HeartbeatRequest, request: Request, token: str | None = Depends(_token),
                        signature: str = Header(alias=SIGNATURE_HEADER, max_length=2048,
                                                description="base64 RSA-PSS/SHA-256 signature of the body bytes")):
        """Report the node's counters; the answer may move the node to another stage."""
        raw = await request.body()  # the signature covers these exact bytes, not a re-serialisation
        answer = await run_in_threadpool(coordinator.heartbeat, token, raw, body, signature)
        metrics.heartbeats.inc()
        return answer

    @app.put("/api/training_report", status_code=204, responses=_REFUSALS)
    def training_report(body: TrainingReport, token: str | None = Depends(_token)):
        """Operators' trainers only: progress (smoothed loss, validation loss, speed) for the dashboard's charts."""
        coordinator.training_report(token, body)
        return Response(status_code=204)

    @app.post("/api/admin/stop_node", response_model=StopNodeAnswer, responses=_REFUSALS)
    def stop_node(body: StopNodeRequest, token: str | None = Depends(_token)):
        """Operators only: withdraw a node's access now; the node stops at its next heartbeat and logs the reason."""
        return coordinator.stop_node(token, body)

    def _store() -> CheckpointStore:
        if store is None:
            raise CoordinatorRefusal(Refusal.CHECKPOINTS_NOT_SERVED)
        return store

    @app.put("/api/checkpoints/{stage}", response_model=CheckpointAnswer,
             responses={**_REFUSALS, 413: {"model": ErrorAnswer}, 202: {"model": UploadStatus,
                        "description": "A part of a resumable upload was stored; the rest is still to come"}},
             openapi_extra={"requestBody": {"required": True, "content": _OCTETS}})
    async def upload_checkpoint(
        request: Request, stage: str = _STAGE, access_token: str | None = Depends(_access_token),
        epoch: int | None = Header(None, alias=CHECKPOINT_EPOCH_HEADER, ge=0, le=2**53,
                                   description="The stage epoch this state was saved at."),
        sha256: str | None = Header(None, alias=CHECKPOINT_SHA256_HEADER, pattern=r"^[0-9a-fA-F]{64}$",
                                    description="sha256 of the whole file; a mismatch refuses the upload."),
        upload_id: str | None = Header(None, alias=UPLOAD_ID_HEADER, pattern=UPLOAD_ID_PATTERN,
                                       description="Makes the upload resumable: the id of this file, the same in every request."),
        offset: int = Header(0, alias=UPLOAD_OFFSET_HEADER, ge=0, le=2**53,
                             description="Resumable: the byte of the file the body begins at (see /api/checkpoint_uploads)."),
        total: int | None = Header(None, alias=UPLOAD_TOTAL_HEADER, ge=1, le=2**53,
                                   description="Resumable: the size of the whole file."),
    ):
        """Replace the stage's checkpoint with the body's bytes. Only a node holding access to this stage may.

        With X-Upload-Id the file may come in several requests: what a request delivered stays even if its
        connection drops, and the next one continues where the coordinator's part ends. The current
        checkpoint keeps being served until the new one has arrived complete and passed its checks."""
        checkpoints = _store()
        uploader = await run_in_threadpool(coordinator.authorize_upload, access_token, stage)
        if upload_id is not None and total is None:
            raise CoordinatorRefusal(Refusal.UPLOAD_NEEDS_TOTAL)
        try:
            if upload_id is None:
                info = await checkpoints.receive(stage, request.stream(), uploader, epoch=epoch,
                                                 expected_size=_content_length(request), expected_sha256=sha256)
            else:
                info = await checkpoints.receive_part(stage, request.stream(), uploader, UploadPart(upload_id, offset, total),
                                                      epoch=epoch, expected_sha256=sha256)
        except ClientDisconnect:
            # a link that dropped is no fault here: a resumable upload keeps what arrived, and nobody reads this answer
            return Response(status_code=400)
        if info is None:
            received, _ = checkpoints.upload_status(stage, uploader, upload_id)
            return JSONResponse(status_code=202, content=UploadStatus(upload_id=upload_id, received=received, total=total).model_dump())
        metrics.checkpoint_uploads.labels(stage).inc()
        return CheckpointAnswer(stage=stage, sha256=info.sha256, size=info.size, epoch=info.epoch,
                                uploader=info.uploader_username, uploaded_at=info.uploaded_at)

    @app.put("/api/checkpoint_uploads/{stage}", response_model=UploadStatus, responses=_REFUSALS)
    async def checkpoint_upload_status(body: UploadStatusRequest, stage: str = _STAGE, access_token: str | None = Depends(_access_token)):
        """How much of this node's resumable upload the coordinator holds: the byte its next request begins at."""
        checkpoints = _store()
        uploader = await run_in_threadpool(coordinator.authorize_upload, access_token, stage)
        received, total = checkpoints.upload_status(stage, uploader, body.upload_id)
        return UploadStatus(upload_id=body.upload_id, received=received, total=total)

    @app.get("/api/checkpoints/{stage}", response_class=FileResponse, responses={
        **_REFUSALS, 200: {"content": _OCTETS}, 206: {"description": "The requested byte range", "content": _OCTETS},
        416: {"description": "The range starts beyond the end of the file"}})
    def download_checkpoint(
        stage: str = _STAGE, token: str | None = Depends(_token),
        range_: str | None = Header(None, alias="Range", max_length=256, description="bytes=<start>- to resume a download"),
        if_range: str | None = Header(None, alias="If-Range", max_length=256,
                                      description="The ETag of the partial file: if it changed, the whole new file comes (200)"),
    ):
        """The stage's latest checkpoint, for nodes of that stage only (see ``Coordinator.authorize_download``).
        ETag and X-Checkpoint-SHA256 carry its sha256, for resuming and checking."""
        checkpoints = _store()
        if stage not in stages:
            raise CoordinatorRefusal(Refusal.UNKNOWN_STAGE, stage=stage)
        info = checkpoints.current(stage)  # whether one exists is no secret: run_info tells as much
        if info is None:
            raise CoordinatorRefusal(Refusal.NO_CHECKPOINT, stage=stage)
        coordinator.authorize_download(token, stage)
        headers = {"ETag": f'"{info.sha256}"', CHECKPOINT_SHA256_HEADER: info.sha256, "Cache-Control": "no-cache"}
        if info.epoch is not None:
            headers[CHECKPOINT_EPOCH_HEADER] = str(info.epoch)
        # FileResponse answers Range and If-Range itself, against the ETag given here
        return FileResponse(info.path, headers=headers, media_type="application/octet-stream",
                            filename=f"{config.run_name}-{stage}.ckpt")

    @app.get("/api/run_info", response_model=RunInfo)
    def run_info():
        """Stages and their workers, queue length and the wait a node joining now can expect."""
        return coordinator.run_info()

    @app.get("/api/contributions", response_model=list[ContributionInfo])
    def contributions():
        """What each participant's node has done, per stage."""
        return coordinator.contributions()

    @app.get("/api/history", response_model=HistoryAnswer)
    def run_history(since: float = Query(0.0, ge=0, description="Unix seconds; only points from then on")):
        """The charts' data: the trainers' reports and the workers per stage over time."""
        return coordinator.history(since)

    @app.get("/api/nodes", response_model=list[NodeInfo])
    def run_nodes(node: str | None = Query(None, max_length=128, description="Only this peer id")):
        """Every node taking part (and the latest that left): state, last heartbeat, queue place, work, timeline."""
        return coordinator.nodes(node)

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    def prometheus_metrics():
        """Prometheus text format: nodes per stage, queue, admissions, refusals, heartbeats, work done."""
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    @app.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
    def dashboard_page():
        return HTMLResponse(dashboard)

    @app.get("/dashboard/snapshot", response_class=HTMLResponse, include_in_schema=False)
    def dashboard_snapshot():
        """The dashboard with its data inside: a file that still shows the run after the coordinator stops."""
        data = {
            "info": coordinator.run_info().model_dump(mode="json"),
            "contributions": [c.model_dump(mode="json") for c in coordinator.contributions()],
            "history": coordinator.history().model_dump(mode="json"),
            "nodes": [n.model_dump(mode="json") for n in coordinator.nodes()],
        }
        # "</" would end the script element early; JSON allows "<\/" for it
        embedded = json.dumps(data).replace("</", "<\\/")
        marker = '<script id="snapshot" type="application/json"></script>'
        return HTMLResponse(dashboard.replace(marker, marker.replace("></", f">{embedded}</"), 1))

    return app
