"""Can the coordinator reach a joining peer on the port it announced? ``probe`` asks the peer's
port-test listener (``agora.membership.port_test``) the question of ``agora.protocol``'s port test.
"""

from __future__ import annotations

import secrets
import socket
import time

from agora.protocol import PORT_TEST_PROBE, PORT_TEST_REPLY, read_port_test_line


def probe(ip: str, port: int, deadline_s: float) -> bool:
    """True if a port-test listener answered at ip:port within ``deadline_s`` seconds."""
    deadline = time.monotonic() + deadline_s
    nonce = secrets.token_hex(16).encode()
    try:
        with socket.create_connection((ip, port), timeout=deadline_s) as sock:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            sock.sendall(PORT_TEST_PROBE + nonce + b"\n")
            return read_port_test_line(sock, deadline) == PORT_TEST_REPLY + nonce + b"\n"
    except (OSError, TimeoutError, ValueError):
        return False
