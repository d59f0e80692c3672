"""Hugging Face's whoami on 127.0.0.1 (no Hub here): known tokens answer their account name, every other
token a 401, and each check is counted."""

from __future__ import annotations

import collections
import http.server
import json
import threading

WHOAMI_PATH = "/api/whoami-v2"


class FakeWhoami:
    def __init__(self, tokens: dict[str, str]):
        """``tokens``: account name of each known token."""
        counts = self.calls = collections.Counter()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                token = self.headers.get("Authorization", "").removeprefix("Bearer ")
                counts[token] += 1
                name = tokens.get(token) if self.path == WHOAMI_PATH else None
                body = json.dumps({"name": name, "type": "user"} if name else {"error": "Invalid credentials"}).encode()
                self.send_response(200 if name else 401)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()
