"""The coordinator's HTTP API as typed calls: each takes and returns ``agora.protocol``'s types.

Calls are PUTs with the participant's token (a checkpoint upload: with the node's access token). A
refusal becomes AdmissionError with the coordinator's message; a call that got no answer (network,
5xx) CoordinatorUnavailable; an answer this peer cannot read MalformedAnswer, never a KeyError.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from typing import TypeVar

import httpx
from pydantic import BaseModel, TypeAdapter, ValidationError

from agora.protocol import (
    CHECKPOINT_EPOCH_HEADER,
    SIGNATURE_HEADER,
    UPLOAD_ID_HEADER,
    UPLOAD_OFFSET_HEADER,
    UPLOAD_TOTAL_HEADER,
    AccessAnswer,
    CheckpointAnswer,
    HeartbeatAnswer,
    HeartbeatRequest,
    JoinAnswer,
    JoinRequest,
    QueuedAnswer,
    RefreshRequest,
    StatusRequest,
    TrainerAccessRequest,
    TrainingReport,
    UploadStatus,
    UploadStatusRequest,
)
from agora_server.peer_keys import WorkerIdentity

Answer = TypeVar("Answer")
Request = TypeVar("Request", bound=BaseModel)

_JOIN_ANSWER = TypeAdapter(JoinAnswer)
_ACCESS = TypeAdapter(AccessAnswer)
_HEARTBEAT_ANSWER = TypeAdapter(HeartbeatAnswer)
_UPLOAD_STATUS = TypeAdapter(UploadStatus)
_UPLOAD_ANSWER = TypeAdapter(CheckpointAnswer | UploadStatus)


class AdmissionError(RuntimeError):
    """The coordinator refused this node, or could not be reached; the message says which (never the token)."""


class CoordinatorUnavailable(AdmissionError):
    """The coordinator did not answer (network, 5xx): worth another try."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message
        """What went wrong, without the address (e.g. ``ConnectError: [Errno 111] Connection refused``)."""


class UploadOutOfStep(AdmissionError):
    """A part of a resumable upload did not begin where the coordinator's part of it ends (or a newer
    request took the upload over): ask for its status and continue from there."""


class MalformedAnswer(AdmissionError):
    """The coordinator answered, but not in a form this peer reads (a field missing or of the wrong
    type): asking again would get the same answer."""


def build_request(model: type[Request], **fields) -> Request:
    """``model(**fields)``; a field the protocol refuses becomes an AdmissionError that names it, as the
    coordinator's refusal of such a body would."""
    try:
        return model(**fields)
    except ValidationError as e:
        raise AdmissionError(f"this node's {model.__name__} is not valid: {_first_problem(e)}") from None


def peer_key(identity: WorkerIdentity) -> dict[str, str]:
    """The fields of ``PeerKeyRequest`` for this identity."""
    return {"peer_id": identity.peer_id, "public_key": base64.b64encode(identity.public_key_protobuf).decode()}


class CoordinatorClient:
    def __init__(self, base_url: str, token: str, timeout: float = 30.0, transport: httpx.BaseTransport | None = None):
        """``transport``: httpx's own over the network unless given (a test's canned answers)."""
        self._http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout, headers={"Authorization": f"Bearer {token}"},
                                  transport=transport)
        self._token, self._timeout, self._transport = token, timeout, transport

    def join(self, request: JoinRequest) -> AccessAnswer | QueuedAnswer:
        return self._put("/api/join", _JOIN_ANSWER, json=request)

    def authorization_status(self, request: StatusRequest) -> AccessAnswer | QueuedAnswer:
        return self._put("/api/authorization_status", _JOIN_ANSWER, json=request)

    def refresh(self, request: RefreshRequest, *, timeout: float | None = None) -> AccessAnswer:
        return self._put("/api/refresh_token", _ACCESS, json=request, timeout=timeout)

    def trainer_access(self, request: TrainerAccessRequest, *, timeout: float | None = None) -> AccessAnswer:
        """Access to call every stage, for a trainer run by one of the run's operators."""
        return self._put("/api/trainer_access", _ACCESS, json=request, timeout=timeout)

    def heartbeat(self, request: HeartbeatRequest, identity: WorkerIdentity, *, timeout: float | None = None) -> HeartbeatAnswer:
        """Sent signed by ``identity``: the signature covers these exact body bytes."""
        body = request.model_dump_json().encode()
        headers = {"Content-Type": "application/json", SIGNATURE_HEADER: base64.b64encode(identity.sign(body)).decode()}
        return self._put("/api/heartbeat", _HEARTBEAT_ANSWER, content=body, headers=headers, timeout=timeout)

    def training_report(self, report: TrainingReport, *, timeout: float | None = None) -> None:
        self._send("/api/training_report", json=report, timeout=timeout)

    def upload_status(self, stage: str, upload_id: str, *, access_token: str) -> UploadStatus:
        """How much of the resumable upload ``upload_id`` the coordinator holds."""
        return self._put(f"/api/checkpoint_uploads/{stage}", _UPLOAD_STATUS, json=UploadStatusRequest(upload_id=upload_id),
                         headers={"Authorization": f"Bearer {access_token}"})

    def upload_checkpoint_part(self, stage: str, chunks: Iterable[bytes], *, upload_id: str, offset: int, total: int,
                               epoch: int, access_token: str) -> CheckpointAnswer | UploadStatus:
        """Send bytes ``offset`` to ``total`` of a resumable upload: the stored checkpoint once the file is whole,
        else how much of it the coordinator holds. UploadOutOfStep when ``offset`` is not where its part ends."""
        headers = {"Authorization": f"Bearer {access_token}", CHECKPOINT_EPOCH_HEADER: str(epoch),
                   "Content-Type": "application/octet-stream", "Content-Length": str(total - offset),
                   UPLOAD_ID_HEADER: upload_id, UPLOAD_OFFSET_HEADER: str(offset), UPLOAD_TOTAL_HEADER: str(total)}
        return self._put(f"/api/checkpoints/{stage}", _UPLOAD_ANSWER, content=chunks, headers=headers,
                         refusals={"upload_offset_mismatch": UploadOutOfStep, "upload_taken_over": UploadOutOfStep})

    def separate(self) -> "CoordinatorClient":
        """A client of the same coordinator and account with connections of its own: a transfer that
        takes minutes on it never delays a call on this one."""
        return CoordinatorClient(self.base_url, self._token, self._timeout, self._transport)

    def auth_for(self, url: str) -> dict[str, str]:
        """The participant's token for a download from ``url``: only when this coordinator serves it
        (it serves a stage's checkpoint only to that stage's nodes), never to weights hosted elsewhere."""
        return {"Authorization": self._http.headers["Authorization"]} if url.startswith(self.base_url + "/") else {}

    @property
    def base_url(self) -> str:
        return str(self._http.base_url).rstrip("/")

    def close(self) -> None:
        self._http.close()

    def _put(self, path: str, answer_type: TypeAdapter[Answer], **request) -> Answer:
        answer = self._send(path, **request)
        try:
            return answer_type.validate_json(answer.content)
        except ValidationError as e:
            raise MalformedAnswer(f"the coordinator at {self.base_url} sent an answer to {path} that this node cannot read"
                                  f" ({_first_problem(e)})") from None

    def _send(self, path: str, *, json: BaseModel | None = None, content: bytes | Iterable[bytes] | None = None,
              headers: dict | None = None, timeout: float | None = None,
              refusals: dict[str, type[AdmissionError]] | None = None) -> httpx.Response:
        """``refusals``: the error to raise for a refusal code the caller handles apart (else AdmissionError)."""
        wait = httpx.USE_CLIENT_DEFAULT if timeout is None else timeout
        body = json.model_dump(mode="json") if json is not None else None
        try:
            answer = self._http.put(path, json=body, content=content, headers=headers, timeout=wait)
        except httpx.HTTPError as e:
            reason = f"{type(e).__name__}: {e}"[:300] if str(e) else type(e).__name__
            raise CoordinatorUnavailable(f"the coordinator at {self._http.base_url} did not answer: {reason}", reason) from None
        if answer.status_code >= 500:
            reason = f"it answered {answer.status_code}: {_detail(answer)}"
            raise CoordinatorUnavailable(f"the coordinator {reason}", reason)
        if answer.status_code >= 400:
            raise (refusals or {}).get(_field(answer, "error"), AdmissionError)(_detail(answer))
        return answer


def _detail(answer: httpx.Response) -> str:
    detail = _field(answer, "detail")
    return detail if isinstance(detail, str) else f"HTTP {answer.status_code}"


def _field(answer: httpx.Response, name: str) -> object:
    try:
        body = answer.json()
    except ValueError:
        return None
    return body.get(name) if isinstance(body, dict) else None


def _first_problem(error: ValidationError) -> str:
    """The first field pydantic refused and why, without the value (it may hold a token)."""
    first = error.errors(include_input=False)[0]
    where = ".".join(str(part) for part in first["loc"])
    return f"{where}: {first['msg']}" if where else first["msg"]
