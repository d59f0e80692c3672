"""Is a TCP port free on this machine? Answered by really binding it, the way the worker will."""

from __future__ import annotations

import socket


def port_is_free(port: int, host: str = "0.0.0.0") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # no SO_REUSEADDR: a listener on any address must count as taken, as it will for the worker
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def parse_port(text: str) -> int:
    """A port number from user input; ValueError with a readable message otherwise."""
    try:
        port = int(str(text).strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"{port} is not a port number (1-65535)")
    return port
