"""What the coordinator remembers across restarts: accounts, identity bindings, the queue, active
nodes, the trainers' data shards, contributions, which checkpoint each stage serves, and the
dashboard's history (node states and their changes, workers per stage over time, the trainers'
reports). SQLAlchemy 2.x models; times are unix seconds (floats) so any backend stores them the same way."""

from __future__ import annotations

import enum
import os
from contextlib import contextmanager
from typing import Iterator

from sqlalchemy import Boolean, Enum, Float, ForeignKey, Integer, String, UniqueConstraint, create_engine, event, inspect, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from agora.coordinator.queue import DropReason, QueueStatus


class Base(DeclarativeBase):
    pass


def _stored_as_value(kind: type[enum.Enum], length: int) -> Enum:
    """A VARCHAR holding the enum's values ("waiting"), as the columns always held plain strings, so the
    database files of earlier coordinators read the same; no native enum type and no CHECK constraint."""
    return Enum(kind, native_enum=False, create_constraint=False, length=length, validate_strings=True,
                values_callable=lambda members: [member.value for member in members])


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    username: Mapped[str] = mapped_column(String(255), unique=True)
    created_at: Mapped[float] = mapped_column(Float)


class IdentityBinding(Base):
    """A libp2p peer id belongs to the first account that joined with it, for good."""

    __tablename__ = "identity_bindings"

    peer_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    public_key: Mapped[str] = mapped_column(String(2048))
    """base64 of the libp2p protobuf PublicKey the peer id is the hash of."""
    last_stage: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[float] = mapped_column(Float)


class QueueRequest(Base):
    """One join: waiting, then admitted or dropped. Queue order is the autoincrement ``seq``."""

    __tablename__ = "queue_requests"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(64), unique=True)
    session_token_sha256: Mapped[str] = mapped_column(String(64))
    peer_id: Mapped[str] = mapped_column(ForeignKey("identity_bindings.peer_id"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    status: Mapped[QueueStatus] = mapped_column(_stored_as_value(QueueStatus, 16), index=True)
    stage: Mapped[str] = mapped_column(String(64))
    drop_reason: Mapped[DropReason | None] = mapped_column(_stored_as_value(DropReason, 64), nullable=True)
    enqueued_at: Mapped[float] = mapped_column(Float)
    last_poll_at: Mapped[float] = mapped_column(Float)
    admitted_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    waited: Mapped[bool] = mapped_column(Boolean, default=False)
    """Admitted out of a non-empty queue; only these admissions feed the wait estimate."""
    download_complete: Mapped[bool] = mapped_column(Boolean, default=False)
    download_bytes: Mapped[int] = mapped_column(Integer, default=0)
    download_total: Mapped[int | None] = mapped_column(Integer, nullable=True)
    device: Mapped[str] = mapped_column(String(128), default="")
    vram_gb: Mapped[float] = mapped_column(Float, default=0.0)
    ram_gb: Mapped[float] = mapped_column(Float, default=0.0)
    bandwidth_mbps: Mapped[float] = mapped_column(Float, default=0.0)
    latency_ms: Mapped[float] = mapped_column(Float, default=0.0)
    announce_ip: Mapped[str] = mapped_column(String(64))
    announce_port: Mapped[int] = mapped_column(Integer)
    code_version: Mapped[str] = mapped_column(String(128))
    email: Mapped[str | None] = mapped_column(String(320), nullable=True)


class NodeStop(Base):
    """An operator stopped this peer; its next call learns why. Cleared when the peer joins again."""

    __tablename__ = "node_stops"

    peer_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    reason: Mapped[str] = mapped_column(String(500))
    operator: Mapped[str] = mapped_column(String(128))
    at: Mapped[float] = mapped_column(Float)


class ActiveNode(Base):
    """A node holding access: it counts against capacity until it leaves or its access expires."""

    __tablename__ = "active_nodes"

    uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    peer_id: Mapped[str] = mapped_column(ForeignKey("identity_bindings.peer_id"), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    stage: Mapped[str] = mapped_column(String(64), index=True)
    granted_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float] = mapped_column(Float)
    last_heartbeat_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_sent_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    reported_samples: Mapped[int] = mapped_column(Integer, default=0)
    reported_tokens: Mapped[int] = mapped_column(Integer, default=0)
    reporting_session: Mapped[str | None] = mapped_column(String(64), nullable=True)
    """The session id of the heartbeats that reported_samples/tokens come from."""


class Contribution(Base):
    """What one peer did on one stage, summed over all its sessions."""

    __tablename__ = "contributions"
    __table_args__ = (UniqueConstraint("peer_id", "stage"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    peer_id: Mapped[str] = mapped_column(ForeignKey("identity_bindings.peer_id"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    stage: Mapped[str] = mapped_column(String(64))
    samples: Mapped[int] = mapped_column(Integer, default=0)
    tokens: Mapped[int] = mapped_column(Integer, default=0)
    seconds_online: Mapped[float] = mapped_column(Float, default=0.0)
    updated_at: Mapped[float] = mapped_column(Float)


class StageCheckpoint(Base):
    """The checkpoint a stage's newcomers download: the latest complete upload. Files are named by sha256."""

    __tablename__ = "stage_checkpoints"

    stage: Mapped[str] = mapped_column(String(64), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(Integer)
    previous_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    """Kept on disk one upload longer, so a download that looked it up just before a replacement still finds it."""
    uploader_peer_id: Mapped[str] = mapped_column(String(128))
    uploader_username: Mapped[str] = mapped_column(String(255))
    epoch: Mapped[int | None] = mapped_column(Integer, nullable=True)
    uploaded_at: Mapped[float] = mapped_column(Float)


class TrainerShard(Base):
    """Which trainer identity reads which shard of the run's data. Kept while its access lasts and
    after: the same trainer restarting gets its shard back, so its saved data position stays valid."""

    __tablename__ = "trainer_shards"

    rank: Mapped[int] = mapped_column(Integer, primary_key=True)
    peer_id: Mapped[str] = mapped_column(String(128), unique=True)
    expires_at: Mapped[float] = mapped_column(Float)
    """When the trainer's latest access runs out; past it, another trainer may take the shard."""


class NodeState(Base):
    """Where one peer stands, for the dashboard: its state, since when, and when it last reported.
    One row per peer id, kept after the node has gone (its last state says how it ended)."""

    __tablename__ = "node_states"

    peer_id: Mapped[str] = mapped_column(ForeignKey("identity_bindings.peer_id"), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    stage: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(32))
    """queued | downloading | starting | warming_up | training | lapsed | left | expired | stopped | restarted | dropped"""
    since: Mapped[float] = mapped_column(Float)
    phase: Mapped[str | None] = mapped_column(String(32), nullable=True)
    """What the node's last heartbeat said it does (warming_up or training); lapsed hides it, not replaces it."""
    last_heartbeat_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    updated_at: Mapped[float] = mapped_column(Float)


class NodeTransition(Base):
    """Every state change of every node: the per-node timelines, and departures for the wait estimate."""

    __tablename__ = "node_transitions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    peer_id: Mapped[str] = mapped_column(String(128), index=True)
    at: Mapped[float] = mapped_column(Float, index=True)
    state: Mapped[str] = mapped_column(String(32))
    stage: Mapped[str] = mapped_column(String(64))


class StageSample(Base):
    """Workers of one stage at one moment, by state: the workers-per-stage chart."""

    __tablename__ = "stage_samples"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[float] = mapped_column(Float, index=True)
    stage: Mapped[str] = mapped_column(String(64))
    training: Mapped[int] = mapped_column(Integer)
    warming_up: Mapped[int] = mapped_column(Integer)
    starting: Mapped[int] = mapped_column(Integer)
    lapsed: Mapped[int] = mapped_column(Integer)
    queued: Mapped[int] = mapped_column(Integer)


class TrainingPoint(Base):
    """One report of a trainer (an operator's): loss, validation loss and speed over time."""

    __tablename__ = "training_points"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[float] = mapped_column(Float, index=True)
    trainer: Mapped[str] = mapped_column(String(128))
    step: Mapped[int] = mapped_column(Integer)
    total_steps: Mapped[int] = mapped_column(Integer, default=0)
    loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    validation_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    tokens_per_second: Mapped[float | None] = mapped_column(Float, nullable=True)
    stages_served: Mapped[int | None] = mapped_column(Integer, nullable=True)
    stages_total: Mapped[int | None] = mapped_column(Integer, nullable=True)
    workers: Mapped[int | None] = mapped_column(Integer, nullable=True)
    dropped: Mapped[int] = mapped_column(Integer, default=0)
    finished: Mapped[bool] = mapped_column(Boolean, default=False)


class Database:
    """Engine and sessions for one database URL; tables are created on first use."""

    def __init__(self, url: str):
        sqlite = url.startswith("sqlite")
        if sqlite:
            _create_private_file(make_url(url).database)
        # FastAPI runs sync endpoints on a thread pool; the SQLite connection must be shareable
        self.engine = create_engine(url, connect_args={"check_same_thread": False} if sqlite else {})
        if sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
        Base.metadata.create_all(self.engine)
        _add_new_nullable_columns(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction: committed when the block ends normally, rolled back on any exception."""
        with self._sessions() as session, session.begin():
            yield session

    def close(self) -> None:
        self.engine.dispose()


def _add_new_nullable_columns(engine) -> None:
    """A database from an older coordinator lacks the nullable columns added since; create_all makes
    only missing tables, so add those columns (None in old rows means "not known")."""
    existing = inspect(engine)
    with engine.begin() as connection:
        for table in Base.metadata.sorted_tables:
            have = {column["name"] for column in existing.get_columns(table.name)}
            for column in table.columns:
                if column.name not in have and column.nullable:
                    kind = column.type.compile(dialect=engine.dialect)
                    connection.exec_driver_sql(f'ALTER TABLE {table.name} ADD COLUMN {column.name} {kind}')


def _create_private_file(path: str | None) -> None:
    """The database holds e-mail addresses and session digests: owner-only, like the key files."""
    if not path or path == ":memory:" or path.startswith("file:"):
        return
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    # a commit is on disk before the answer leaves, so a crash right after loses nothing acknowledged
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.close()
