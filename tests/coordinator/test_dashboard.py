"""The dashboard page rendered by headless Chromium (Debian's chromium) against a running coordinator
that holds real contributions, reported through signed heartbeats."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from html.parser import HTMLParser

import pytest

from agora.coordinator.tokens import add_token

from .test_api import join

HOSTILE_NAME = "<script>document.title='owned'</script>"


class _Cells(HTMLParser):
    """Text of elements by id, and the rows (cell texts) of every table that has a data-stage."""

    def __init__(self):
        super().__init__()
        self.by_id: dict[str, str] = {}
        self.tables: dict[str, list[list[str]]] = {}
        self._open: list[tuple[str, str | None]] = []  # (tag, id) of the elements we are inside
        self._table: str | None = None
        self._row: list[str] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self._open.append((tag, attrs.get("id")))
        if tag == "table" and "data-stage" in attrs:
            self._table = attrs["data-stage"]
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag):
        while self._open:
            open_tag, _ = self._open.pop()
            if open_tag == tag:
                break
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        for _, element_id in self._open:
            if element_id:
                self.by_id[element_id] = self.by_id.get(element_id, "") + data


def rendered_dom(url: str, profile_dir) -> str:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium is not installed: `apt-get install chromium` (agora_cli.py test installs it)")
    proc = subprocess.Popen(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={profile_dir}",
         "--virtual-time-budget=8000", "--dump-dom", url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:  # browser helpers share its process group: take them all down
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0 and "</html>" in out, f"chromium failed ({proc.returncode}): {err[-2000:]}"
    return out


def test_dashboard_shows_live_run_and_contribution_figures(harness, listener, tmp_path):
    harness.tokens[HOSTILE_NAME] = add_token(harness.token_file, HOSTILE_NAME)
    coord = harness.start(access_token_lifetime_s=7200, queue={"capacity": 3, "abandon_after_s": 100_000})
    alice, bob, hostile, waiting = (harness.node(u) for u in ("alice", "bob", HOSTILE_NAME, "carol"))
    uids = {}
    for node in (alice, bob, hostile):
        answer = join(coord, node, listener.port).json()
        assert answer["status"] == "access"
        uids[node.peer_id] = answer["uid"]
    assert join(coord, waiting, listener.port).json()["status"] == "queued"

    def heartbeat(node, samples, tokens):
        raw, headers = node.signed_heartbeat(uids[node.peer_id], harness.clock.now, samples, tokens)
        assert coord.http.put("/api/heartbeat", content=raw, headers=headers).status_code == 200

    for node in (alice, bob, hostile):
        heartbeat(node, 0, 0)
    harness.clock.advance(90)
    heartbeat(bob, 64, 32_768)
    harness.clock.advance(3635)
    heartbeat(alice, 12_345, 6_320_640)
    heartbeat(hostile, 7, 3584)
    info = coord.http.get("/api/run_info").json()
    assert (info["queue_length"], info["estimated_wait_seconds"]) == (1, 600)  # two places at 300 s each

    dom = rendered_dom(f"{coord.url}/?refresh=1", tmp_path / "chromium-profile")
    page = _Cells()
    page.feed(dom)

    assert page.by_id["run-name"] == "Agora run agora"
    assert (page.by_id["active-nodes"], page.by_id["capacity"], page.by_id["queue-length"]) == ("3", "3", "1")
    assert page.by_id["wait"] == "about 10m 00s"
    assert "error" not in page.by_id["status"] and page.by_id["status"].startswith("updated")

    def rows(stage):
        return [r for r in page.tables[stage] if r and r[0] not in ("Participant", "Total")]

    def short(peer_id):
        return f"{peer_id[:6]}…{peer_id[-6:]}"

    assert rows("head") == [["alice", short(alice.peer_id), "12,345", "6,320,640", "1h 02m"]]
    assert rows("body1") == [["bob", short(bob.peer_id), "64", "32,768", "1m 30s"]]
    assert rows("tail") == [[HOSTILE_NAME, short(hostile.peer_id), "7", "3,584", "1h 02m"]]
    assert page.tables["head"][-1][:4] == ["Total", "1 node", "12,345", "6,320,640"]

    # the hostile name is text, not markup: escaped in the DOM, and its script never ran
    assert "&lt;script&gt;document.title='owned'&lt;/script&gt;" in dom
    assert HOSTILE_NAME not in dom and "<title>owned</title>" not in dom
    # the page kept polling while Chromium ran, replacing its tables rather than appending to them
    polls = int(dom.split('data-polls="', 1)[1].split('"', 1)[0])
    assert polls >= 2, polls


def test_dashboard_is_self_contained(harness):
    coord = harness.start()
    page = coord.http.get("/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert coord.http.get("/").text == page.text
    for external in ("http://", "https://", "//cdn", "<link", "src="):
        assert external not in page.text, external
