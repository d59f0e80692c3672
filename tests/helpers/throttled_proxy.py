"""A TCP proxy on 127.0.0.1 that limits what each connection may send upstream to a rate, as a home
link's upload does, and notes when each HTTP request line passed through it.

Each connection is shaped on its own, so small calls on one connection go through at once while a
large body crawls on another: what a participant's uplink does to a checkpoint upload next to its
heartbeats (the kernel's queues would make them share; this is the case the code must handle anyway).
``cut`` drops a connection in the middle of a request, as a link that goes down does.
"""

from __future__ import annotations

import re
import socket
import threading
import time

_REQUEST_LINE = re.compile(rb"(GET|PUT|POST|HEAD|DELETE) (/[^ ?]*)[^ ]* HTTP/1\.[01]\r\n")


class ThrottledProxy:
    def __init__(self, upstream_port: int, bytes_per_second: float):
        self.upstream_port, self.rate = upstream_port, bytes_per_second
        self.requests: list[tuple[float, str, str]] = []
        """(time.monotonic(), method, path) of every request line seen going upstream."""
        self.bytes_to: dict[str, int] = {}
        """Bytes sent upstream per path: each read counts for the last request line seen on its connection."""
        self._cut: tuple[str, int] | None = None
        self.cuts = 0
        self._lock = threading.Lock()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # a small receive window, as a slow link's: the sender's kernel cannot take megabytes ahead of
        # the link, so what the sender counts as sent is what went through (set before listen to apply)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen()
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._closed = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._start(self._accept)

    def _start(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            self._sockets += [client, upstream]
            self._start(self._pump, client, upstream, True)
            self._start(self._pump, upstream, client, False)

    def cut(self, path: str, after_bytes: int) -> None:
        """Drop, once, the connection of the next request to ``path`` after ``after_bytes`` of it went upstream."""
        with self._lock:
            self._cut = (path, after_bytes)

    def _pump(self, source: socket.socket, sink: socket.socket, shaped: bool) -> None:
        started, sent, carry = time.monotonic(), 0, b""
        path, on_path = "", 0
        try:
            while data := source.recv(16384):
                if shaped:
                    carry, path, on_path = self._note_requests(carry, data, path, on_path)
                    if self._cutting(path, on_path):
                        break
                    sent += len(data)
                    # the link's pace: this connection's bytes so far may not be ahead of the rate
                    ahead = sent / self.rate - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _note_requests(self, carry: bytes, data: bytes, path: str, on_path: int) -> tuple[bytes, str, int]:
        """(what to look at again with the next read, the connection's current path, its bytes so far):
        a read counts whole for the path of the last request line in it (a few bytes' slack)."""
        now, end, text = time.monotonic(), 0, carry + data
        with self._lock:
            for match in _REQUEST_LINE.finditer(text):
                self.requests.append((now, match.group(1).decode(), match.group(2).decode()))
                end, path, on_path = match.end(), match.group(2).decode(), 0
            on_path += len(data)
            self.bytes_to[path] = self.bytes_to.get(path, 0) + len(data)
        return text[end:][-200:], path, on_path  # a request line split over two reads is found in the next look

    def _cutting(self, path: str, on_path: int) -> bool:
        with self._lock:
            if self._cut is None or self._cut[0] != path or on_path < self._cut[1]:
                return False
            self._cut, self.cuts = None, self.cuts + 1
            return True

    def times_of(self, path: str) -> list[float]:
        with self._lock:
            return sorted(t for t, _, p in self.requests if p == path)

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        for s in self._sockets:
            try:
                s.close()
            except OSError:
                pass
        for thread in self._threads:
            thread.join(5)
