"""TCP ports of this machine: is one free (answered by really binding it, the way the worker will), a free one, parsing one."""

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


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS has just handed out on ``host`` (free now; a later bind may still race another process)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def parse_port(text: str) -> int:
    """A port number from user input; ValueError with a readable message otherwise."""
    try:
        port = int(str(text).strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"{port} is not a port number (1-65535)")
    return port
