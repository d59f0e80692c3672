"""Real coordinators on 127.0.0.1 (uvicorn on an ephemeral port, SQLite file in tmp_path), always stopped."""

from __future__ import annotations

import base64
import functools
import io
import json
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from cryptography.hazmat.primitives.asymmetric import rsa

from agora.config import load_run_config
from agora.coordinator.app import create_app
from agora.coordinator.checkpoint_check import stage_layouts
from agora.coordinator.config import CoordinatorConfig
from agora_server.peer_keys import WorkerIdentity
from agora.membership.port_test import PortTestListener
from agora.coordinator.tokens import add_token
from tests.helpers.clock import ManualClock

USERS = ("alice", "bob", "carol")
RUN_CONFIG = Path(__file__).parent / "three_stage_run.yaml"
"""The run the harness's coordinators admit to: head, body1, tail."""


@functools.cache
def _layouts() -> dict:
    return stage_layouts(load_run_config(RUN_CONFIG))


def stage_state(size: int, epoch: int = 0, stage: str = "head", **extra) -> bytes:
    """A state of ``stage`` of RUN_CONFIG as a worker saves it (weights of the stage's exact layout,
    optimizer, epoch, and ``extra`` entries such as ``counters``), random and padded in the optimizer
    state to at least ``size`` bytes."""
    weights = {name: torch.randn(shape, dtype=dtype) for name, (shape, dtype) in _layouts()[stage].items()}
    padding = max(1, (size - sum(w.numel() * w.element_size() for w in weights.values())) // 4)
    buffer = io.BytesIO()
    torch.save({"model": weights, "optimizer": {"state": {0: {"exp_avg": torch.randn(padding)}}}, "epoch": epoch, **extra},
               buffer)
    return buffer.getvalue()


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config):
        super().__init__(config)
        self.ready = threading.Event()

    async def startup(self, sockets=None):
        await super().startup(sockets=sockets)
        self.ready.set()


class RunningCoordinator:
    """One uvicorn server in a thread, listening on a socket bound before it starts (no port race)."""

    def __init__(self, app):
        self.app = app
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._server = _Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)
        self._thread.start()
        if not self._server.ready.wait(30):
            self.stop()
            raise RuntimeError("coordinator did not start within 30 s")
        self.http = httpx.Client(base_url=self.url, timeout=30)

    def stop(self) -> None:
        if hasattr(self, "http"):
            self.http.close()
        self._server.should_exit = True
        self._thread.join(30)
        self._sock.close()
        assert not self._thread.is_alive(), "coordinator thread did not stop"


class Node:
    """A worker as the coordinator sees it: an identity key and an account token."""

    def __init__(self, token: str, identity: WorkerIdentity):
        self.token, self.identity = token, identity

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    @property
    def auth(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"}

    def join_body(self, port: int, **overrides) -> dict:
        body = {
            "peer_id": self.peer_id,
            "public_key": base64.b64encode(self.identity.public_key_protobuf).decode(),
            "device": "NVIDIA RTX 4090", "vram_gb": 24, "ram_gb": 96, "bandwidth_mbps": 500, "latency_ms": 20,
            "announce_port": port, "code_version": "v-test", "email": None,
        }
        body.update(overrides)
        return body

    def signed_heartbeat(self, uid: str, sent_at: float, samples: int, tokens: int, **extra) -> tuple[bytes, dict]:
        """``extra``: further body fields, e.g. ``phase="warming_up"`` or ``leaving=True``."""
        raw = json.dumps({"peer_id": self.peer_id, "uid": uid, "sent_at": sent_at,
                          "samples_processed": samples, "tokens_processed": tokens, **extra}).encode()
        headers = {**self.auth, "Content-Type": "application/json",
                   "X-Agora-Signature": base64.b64encode(self.identity.sign(raw)).decode()}
        return raw, headers




def new_identity() -> WorkerIdentity:
    return WorkerIdentity(rsa.generate_private_key(public_exponent=65537, key_size=2048))


class CoordinatorHarness:
    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.token_file = tmp_path / "tokens.txt"
        self.tokens = {user: add_token(self.token_file, user) for user in USERS}
        self.clock = ManualClock(time.time())
        self.running: list[RunningCoordinator] = []

    def config(self, **overrides) -> CoordinatorConfig:
        base = {
            "database_url": f"sqlite:///{self.tmp_path / 'coordinator.db'}",
            "key_path": str(self.tmp_path / "coordinator.key"),
            "token_source": str(self.token_file),
            "run_config": str(RUN_CONFIG),
            "accepted_code_versions": ["v-test"],
            "port_test": {"deadline_s": 2.0},
        }
        for key, value in overrides.items():
            base[key] = {**base[key], **value} if isinstance(value, dict) and isinstance(base.get(key), dict) else value
        return CoordinatorConfig.model_validate(base)

    def start(self, **overrides) -> RunningCoordinator:
        running = RunningCoordinator(create_app(self.config(**overrides), clock=self.clock))
        self.running.append(running)
        return running

    def node(self, user: str = "alice", identity: WorkerIdentity | None = None) -> Node:
        return Node(self.tokens[user], identity or new_identity())

    def stop_all(self) -> None:
        errors = []
        for running in self.running:
            try:
                running.stop()
            except Exception as e:  # stop every server even if one misbehaves
                errors.append(e)
        self.running.clear()
        assert not errors, errors


@pytest.fixture
def harness(tmp_path):
    h = CoordinatorHarness(tmp_path)
    try:
        yield h
    finally:
        h.stop_all()


@pytest.fixture
def listener():
    with PortTestListener("127.0.0.1", 0) as lst:
        yield lst
