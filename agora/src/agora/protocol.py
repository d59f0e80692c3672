"""The coordinator's protocol, one definition for both sides: the request and answer bodies of its
HTTP API, the headers beside them, and the lines of the port test.

The coordinator validates requests with these types (FastAPI turns them into the OpenAPI spec);
peers build their requests from them and parse the answers into them (``agora.membership.client``).
Both tolerate unknown fields, so a newer peer can talk to an older coordinator and a newer
coordinator to an older peer.
"""

from __future__ import annotations

import socket
import time
from ipaddress import IPv4Address, IPv6Address
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

SIGNATURE_HEADER = "X-Agora-Signature"
"""On a heartbeat: base64 of the RSA-PSS signature of the exact body bytes by the peer's identity key."""
CHECKPOINT_EPOCH_HEADER = "X-Checkpoint-Epoch"
"""On a checkpoint upload and download: the stage epoch the state was saved at."""
CHECKPOINT_SHA256_HEADER = "X-Checkpoint-SHA256"
"""On a checkpoint upload (optional) and download: sha256 of the body."""
UPLOAD_ID_HEADER = "X-Upload-Id"
"""On a resumable checkpoint upload: the id the uploader chose for this file (32 hex digits), the same
for every request that sends a part of it. Without it an upload is sent whole in one request."""
UPLOAD_OFFSET_HEADER = "X-Upload-Offset"
"""On a resumable checkpoint upload: the byte of the file this request's body begins at."""
UPLOAD_TOTAL_HEADER = "X-Upload-Total"
"""On a resumable checkpoint upload: the size of the whole file."""
UPLOAD_ID_PATTERN = r"^[0-9a-f]{32}$"

_COUNT = Field(ge=0, le=2**53)
_MEASURE = Field(default=0.0, ge=0, le=1e9)


class _Request(BaseModel):
    """Requests ignore fields they do not know: a newer peer may send some."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class _Answer(BaseModel):
    """Answers ignore fields they do not know: a newer coordinator may send some."""

    model_config = ConfigDict(extra="ignore")


class PeerKeyRequest(_Request):
    peer_id: str = Field(min_length=1, max_length=128, pattern=r"^[1-9A-HJ-NP-Za-km-z]+$")
    """base58 libp2p peer id of the peer's identity key."""
    public_key: str = Field(min_length=1, max_length=6000)
    """base64 of the libp2p PublicKey protobuf that peer_id is the multihash of."""


class TrainerAccessRequest(PeerKeyRequest):
    """A trainer asks for (or renews) access to call every stage; operators only."""


class JoinRequest(PeerKeyRequest):
    device: str = Field(default="", max_length=128)
    vram_gb: float = _MEASURE
    ram_gb: float = _MEASURE
    bandwidth_mbps: float = _MEASURE
    latency_ms: float = _MEASURE
    announce_ip: IPv4Address | IPv6Address | None = None
    """Public address to test; defaults to the address the request came from."""
    announce_port: int = Field(ge=1, le=65535)
    code_version: str = Field(min_length=1, max_length=128)
    email: str | None = Field(default=None, max_length=320)


class DownloadProgress(_Request):
    bytes_done: int = Field(default=0, ge=0, le=2**53)
    bytes_total: int | None = Field(default=None, ge=0, le=2**53)
    complete: bool = False


class UploadStatusRequest(_Request):
    """How much of a resumable checkpoint upload the coordinator holds (asked with the node's access token)."""

    upload_id: str = Field(pattern=UPLOAD_ID_PATTERN)


class StatusRequest(_Request):
    request_id: str = Field(min_length=1, max_length=64)
    session_token: str = Field(min_length=1, max_length=128)
    download: DownloadProgress = DownloadProgress()


class RefreshRequest(_Request):
    peer_id: str = Field(min_length=1, max_length=128)
    uid: str = Field(min_length=1, max_length=64)


class HeartbeatRequest(_Request):
    """Signed as sent: see ``SIGNATURE_HEADER``."""

    peer_id: str = Field(min_length=1, max_length=128)
    uid: str = Field(min_length=1, max_length=64)
    sent_at: float = Field(ge=0, le=1e11)
    """Unix seconds; must grow from one heartbeat to the next."""
    session: str | None = Field(default=None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    """Random per worker process: totals under a new session start again from zero (a restart), a lower
    total under the same session credits nothing. Older workers send none."""
    samples_processed: int = _COUNT
    """Totals since this access was granted in this session (not since the last heartbeat)."""
    tokens_processed: int = _COUNT
    phase: Literal["warming_up", "training"] | None = None
    """What the node does now: catching up with its stage, or training (older workers send none)."""
    leaving: bool = False
    """The node is stopping: its access ends now and its place frees up at once."""


class TrainingReport(_Request):
    """A trainer's progress, for the dashboard's charts; operators' trainers only."""

    peer_id: str = Field(min_length=1, max_length=128)
    step: int = _COUNT
    """Micro-batches completed so far."""
    total_steps: int = Field(default=0, ge=0, le=2**53)
    loss: float | None = Field(default=None, ge=0, le=1e6)
    """Smoothed training loss."""
    validation_loss: float | None = Field(default=None, ge=0, le=1e6)
    """Set when this report is a validation measurement."""
    tokens_per_second: float | None = Field(default=None, ge=0, le=1e12)
    stages_served: int | None = Field(default=None, ge=0, le=10_000)
    stages_total: int | None = Field(default=None, ge=0, le=10_000)
    workers: int | None = Field(default=None, ge=0, le=10**7)
    dropped: int = Field(default=0, ge=0, le=2**53)
    finished: bool = False


class StopNodeRequest(_Request):
    peer_id: str = Field(min_length=1, max_length=128)
    reason: str = Field(min_length=1, max_length=500)
    """Shown to the node's owner in its log."""


class StopNodeAnswer(_Answer):
    peer_id: str
    was_active: bool


class AccessAnswer(_Answer):
    status: Literal["access"] = "access"
    stage: str
    uid: str
    username: str
    peer_id: str
    access_token: str
    expires_at: float
    checkpoint_url: str | None
    coordinator_public_key: str
    dashboard_url: str | None = None
    """This node's view on the run's dashboard."""
    data_shard: int | None = None
    """A trainer's shard of the run's data (its rank), the same for its identity whenever it asks; None for a worker."""
    data_shards: int | None = None
    """Shards the run's data is split into (the trainers' world size); None for a worker."""


class QueuedAnswer(_Answer):
    status: Literal["queued"] = "queued"
    request_id: str
    session_token: str | None
    """Only in the answer to the join; keep it to poll the request."""
    position: int
    estimated_wait_seconds: float | None
    """None while joins are paused."""
    next_poll_seconds: float
    joins_paused: bool
    stage: str
    """Chosen at join so the node can download this stage's weights while it waits."""
    download_required: bool
    checkpoint_url: str | None


JoinAnswer = Annotated[AccessAnswer | QueuedAnswer, Field(discriminator="status")]


class HeartbeatAnswer(_Answer):
    expires_at: float
    move_to_stage: str | None = None
    """Set when the coordinator moves this node to another stage; access_token is then for that stage."""
    access_token: str | None = None


class StageInfo(_Answer):
    name: str
    need: int
    workers: int
    """Nodes holding access to this stage (lapsed ones included: they hold a place until it expires)."""
    serving: int = 0
    """Of those, the ones that have not lapsed: starting, warming up or training."""
    training: int = 0
    warming_up: int = 0
    lapsed: int = 0
    queued: int = 0
    """Waiting in the queue for this stage."""


class RunInfo(_Answer):
    run_name: str
    stages: list[StageInfo]
    capacity: int
    active_nodes: int
    queue_length: int
    estimated_wait_seconds: float | None
    """For a node that joins now; None while joins are paused or before two departures were seen."""
    wait_estimate_basis: str = ""
    """What the estimate rests on, in words (the departures it was measured from)."""
    joins_paused: bool
    coordinator_public_key: str
    """Checks every access token of the run; seeds need it to refuse records from unadmitted peers."""


class ContributionInfo(_Answer):
    username: str
    peer_id: str
    stage: str
    samples: int
    tokens: int
    seconds_online: float


class ErrorAnswer(_Answer):
    detail: str
    error: str


class CheckpointAnswer(_Answer):
    """The checkpoint a stage now serves, as stored after an upload."""

    stage: str
    sha256: str
    size: int
    epoch: int | None
    uploader: str
    uploaded_at: float


class UploadStatus(_Answer):
    """A resumable checkpoint upload the coordinator holds part of: the next request continues at ``received``
    (0 when it holds none of that upload, e.g. after it expired or the coordinator restarted)."""

    upload_id: str
    received: int
    total: int


class TimelineEntry(_Answer):
    at: float
    state: str
    stage: str


class NodeInfo(_Answer):
    """One node as the dashboard shows it."""

    peer_id: str
    username: str
    stage: str
    state: str
    """queued, downloading, starting, warming_up, training or lapsed while it takes part; left,
    expired, stopped, restarted or dropped once it has gone."""
    since: float
    last_heartbeat_at: float | None
    queue_position: int | None = None
    download_bytes: int | None = None
    download_total: int | None = None
    samples: int = 0
    tokens: int = 0
    timeline: list[TimelineEntry] = []
    """Its latest state changes, oldest first."""


class TrainingSample(_Answer):
    at: float
    step: int
    total_steps: int
    loss: float | None
    validation_loss: float | None
    tokens_per_second: float | None
    stages_served: int | None
    stages_total: int | None
    workers: int | None
    dropped: int
    finished: bool


class StageSampleInfo(_Answer):
    at: float
    training: int
    warming_up: int
    starting: int
    lapsed: int
    queued: int


class HistoryAnswer(_Answer):
    """The dashboard's time series, oldest first, each thinned to at most ``dashboard.history_points``."""

    now: float
    training: list[TrainingSample]
    stages: dict[str, list[StageSampleInfo]]


# The port test: the coordinator connects to the announced ip:port, sends PORT_TEST_PROBE + nonce + "\n"
# and expects PORT_TEST_REPLY + the same nonce + "\n" back. The nonce makes sure it was the joining
# peer's listener that answered, not whatever else happens to hold the port.
PORT_TEST_PROBE = b"AGORA-PORT-TEST "
PORT_TEST_REPLY = b"AGORA-PORT-OK "
_PORT_TEST_MAX_LINE = 128


def read_port_test_line(sock: socket.socket, deadline: float) -> bytes:
    """One line of the port test (at most 128 bytes), read before ``deadline`` (``time.monotonic``)."""
    data = b""
    while not data.endswith(b"\n") and len(data) < _PORT_TEST_MAX_LINE:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no complete line before the deadline")
        sock.settimeout(remaining)
        chunk = sock.recv(_PORT_TEST_MAX_LINE - len(data))
        if not chunk:
            break
        data += chunk
    return data
