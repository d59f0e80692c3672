"""The joining peer's side of the port test: a listener on the port the peer announced, open only
while it joins (before its p2p daemon takes the port), answering the coordinator's probe."""

from __future__ import annotations

import socketserver
import threading
import time

from agora.protocol import PORT_TEST_PROBE, PORT_TEST_REPLY, read_port_test_line


class _Answer(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        try:
            line = read_port_test_line(self.request, time.monotonic() + 10.0)
            if line.startswith(PORT_TEST_PROBE) and line.endswith(b"\n"):
                self.request.sendall(PORT_TEST_REPLY + line[len(PORT_TEST_PROBE):])
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
