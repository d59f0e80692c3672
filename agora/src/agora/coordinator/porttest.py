"""Can the coordinator reach a worker on the port it announced?

The coordinator connects to ip:port, sends ``AGORA-PORT-TEST <nonce>\\n`` and expects
``AGORA-PORT-OK <nonce>\\n`` back before the deadline. The nonce makes sure it was our listener
that answered, not whatever else happens to hold the port. The worker runs ``PortTestListener``
on its host port only while it joins, before its p2p daemon takes the port.
"""

from __future__ import annotations

import secrets
import socket
import socketserver
import threading
import time

PROBE = b"AGORA-PORT-TEST "
REPLY = b"AGORA-PORT-OK "
_MAX_LINE = 128


def _read_line(sock: socket.socket, deadline: float) -> bytes:
    data = b""
    while not data.endswith(b"\n") and len(data) < _MAX_LINE:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no complete line before the deadline")
        sock.settimeout(remaining)
        chunk = sock.recv(_MAX_LINE - len(data))
        if not chunk:
            break
        data += chunk
    return data


def probe(ip: str, port: int, deadline_s: float) -> bool:
    """True if a port-test listener answered at ip:port within ``deadline_s`` seconds."""
    deadline = time.monotonic() + deadline_s
    nonce = secrets.token_hex(16).encode()
    try:
        with socket.create_connection((ip, port), timeout=deadline_s) as sock:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            sock.sendall(PROBE + nonce + b"\n")
            return _read_line(sock, deadline) == REPLY + nonce + b"\n"
    except (OSError, TimeoutError, ValueError):
        return False


class _Answer(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        try:
            line = _read_line(self.request, time.monotonic() + 10.0)
            if line.startswith(PROBE) and line.endswith(b"\n"):
                self.request.sendall(REPLY + line[len(PROBE):])
        except (OSError, TimeoutError):
            pass  # a broken probe is the prober's problem; keep listening


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


class PortTestListener:
    """Answers port tests on (host, port) until closed; use as a context manager around the join."""

    def __init__(self, host: str = "0.0.0.0", port: int = 0):
        self._server = _Server((host, port), _Answer)
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="port-test-listener", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> "PortTestListener":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
