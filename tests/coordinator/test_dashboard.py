"""The dashboard page rendered by headless Chromium against a running coordinator that holds real
contributions (reported through signed heartbeats) and a trainer's reports: figures, node states,
"your node", the charts and the saved copy."""

from __future__ import annotations

from html.parser import HTMLParser

from agora.coordinator.tokens import add_token
from tests.helpers.chromium import charts_in, rendered_dom

from .test_api import join

HOSTILE_NAME = "<script>document.title='owned'</script>"


class _Cells(HTMLParser):
    """Text of elements by id, the rows (cell texts) of every table that has a data-stage, and the
    state badge of every node row (data-peer)."""

    def __init__(self):
        super().__init__()
        self.by_id: dict[str, str] = {}
        self.tables: dict[str, list[list[str]]] = {}
        self.node_states: dict[str, str] = {}
        self.mine: list[str] = []
        self.hidden: set[str] = set()
        self._open: list[tuple[str, str | None]] = []  # (tag, id) of the elements we are inside
        self._table: str | None = None
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self._peer: str | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self._open.append((tag, attrs.get("id")))
        if "hidden" in attrs and attrs.get("id"):
            self.hidden.add(attrs["id"])
        if tag == "tr" and "data-peer" in attrs:
            self._peer = attrs["data-peer"]
            if "mine" in (attrs.get("class") or ""):
                self.mine.append(self._peer)
        if tag == "span" and "data-state" in attrs and self._peer is not None and self._peer not in self.node_states:
            self.node_states[self._peer] = attrs["data-state"]
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
        elif tag == "tr":
            if self._row is not None:
                self.tables[self._table].append(self._row)
                self._row = None
            self._peer = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        for _, element_id in self._open:
            if element_id:
                self.by_id[element_id] = self.by_id.get(element_id, "") + data


def read_page(dom: str) -> _Cells:
    page = _Cells()
    page.feed(dom)
    return page


def test_dashboard_shows_live_run_node_states_and_contribution_figures(harness, listener, tmp_path):
    harness.tokens[HOSTILE_NAME] = add_token(harness.token_file, HOSTILE_NAME)
    coord = harness.start(access_token_lifetime_s=7200, queue={"capacity": 3, "abandon_after_s": 100_000})
    alice, bob, hostile, waiting = (harness.node(u) for u in ("alice", "bob", HOSTILE_NAME, "carol"))
    uids = {}
    for node in (alice, bob, hostile):
        answer = join(coord, node, listener.port).json()
        assert answer["status"] == "access"
        assert answer["dashboard_url"] == f"{coord.url}/?node={node.peer_id}"
        uids[node.peer_id] = answer["uid"]
    assert join(coord, waiting, listener.port).json()["status"] == "queued"

    def heartbeat(node, samples, tokens, **extra):
        raw, headers = node.signed_heartbeat(uids[node.peer_id], harness.clock.now, samples, tokens, **extra)
        assert coord.http.put("/api/heartbeat", content=raw, headers=headers).status_code == 200

    for node in (alice, bob, hostile):
        heartbeat(node, 0, 0)
    harness.clock.advance(90)
    heartbeat(bob, 64, 32_768)
    harness.clock.advance(3635)
    heartbeat(alice, 12_345, 6_320_640)
    heartbeat(hostile, 7, 3584, phase="warming_up")
    info = coord.http.get("/api/run_info").json()
    # nobody has left the full run: no wait figure; bob has been silent for an hour: lapsed, not serving
    assert (info["queue_length"], info["estimated_wait_seconds"]) == (1, None)
    assert {s["name"]: (s["serving"], s["lapsed"], s["warming_up"]) for s in info["stages"]} == {
        "head": (1, 0, 0), "body1": (0, 1, 0), "tail": (1, 0, 1)}

    dom = rendered_dom(f"{coord.url}/?refresh=1&node={alice.peer_id}", tmp_path / "chromium-profile")
    page = read_page(dom)

    assert page.by_id["run-name"] == "Agora run agora"
    assert (page.by_id["active-nodes"], page.by_id["capacity"], page.by_id["queue-length"]) == ("2", "3", "1")
    assert page.by_id["wait"] == "not known yet"
    assert "fewer than two nodes have left" in page.by_id["wait-basis"]
    assert "error" not in page.by_id["status"] and page.by_id["status"].startswith("updated")
    assert page.node_states == {alice.peer_id: "training", bob.peer_id: "lapsed", hostile.peer_id: "warming_up",
                                waiting.peer_id: "queued"}
    # the viewer's node: marked in the table and described on top
    assert page.mine == [alice.peer_id]
    assert "your-node" not in page.hidden and "12,345" in page.by_id["your-node-body"]

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


def test_dashboard_charts_the_trainers_reports_and_the_workers_over_time(harness, listener, tmp_path):
    coord = harness.start(operators=["carol"], dashboard={"sample_interval_s": 10})
    node = harness.node("alice")
    uid = join(coord, node, listener.port).json()["uid"]
    trainer = harness.node("carol")
    # every call below comes 20 s after the last on the coordinator's clock: one workers sample each
    for step in range(0, 60, 10):
        harness.clock.advance(20)
        raw, headers = node.signed_heartbeat(uid, harness.clock.now, step * 4, step * 512)
        assert coord.http.put("/api/heartbeat", content=raw, headers=headers).status_code == 200
        report = {"peer_id": trainer.peer_id, "step": step, "total_steps": 60, "loss": 9.0 - step / 20,
                  "tokens_per_second": 1000 + step, "stages_served": 1, "stages_total": 3, "workers": 1}
        assert coord.http.put("/api/training_report", json=report, headers=trainer.auth).status_code == 204
        if step % 20 == 0:
            validation = {"peer_id": trainer.peer_id, "step": step, "validation_loss": 9.1 - step / 20}
            assert coord.http.put("/api/training_report", json=validation, headers=trainer.auth).status_code == 204
    refused = coord.http.put("/api/training_report", json={"peer_id": node.peer_id, "step": 1}, headers=node.auth)
    assert refused.status_code == 403, "only operators' trainers report training"

    history = coord.http.get("/api/history").json()
    assert [p["step"] for p in history["training"] if p["validation_loss"] is None] == [0, 10, 20, 30, 40, 50]
    assert [p["validation_loss"] for p in history["training"] if p["validation_loss"] is not None] == [9.1 - s / 20 for s in (0, 20, 40)]
    assert len(history["stages"]["head"]) >= 6 and history["stages"]["head"][-1]["training"] == 1

    dom = rendered_dom(f"{coord.url}/?refresh=1", tmp_path / "chromium-profile")
    page = read_page(dom)
    assert (page.by_id["step"], page.by_id["served"]) == ("50 / 60", "1 / 3"), "the trainer's latest report"
    charts = charts_in(dom).charts
    assert charts["loss"] == {"training (smoothed)": 6, "validation": 3}
    assert charts["tokens_per_second"] == {"tokens/s (trainer)": 6}
    assert charts["workers"]["head"] >= 6 and charts["workers"]["body1"] >= 6
    assert charts["node_states"]["training"] >= 6

    # the saved copy draws the same charts with the coordinator gone
    saved = tmp_path / "dashboard.html"
    saved.write_text(coord.http.get("/dashboard/snapshot").text)
    harness.stop_all()
    copy = rendered_dom(saved.as_uri(), tmp_path / "chromium-profile-2", budget_ms=3000)
    assert charts_in(copy).charts["loss"] == {"training (smoothed)": 6, "validation": 3}
    assert "saved copy of" in read_page(copy).by_id["status"]


def test_a_leaving_node_frees_its_place_and_departures_give_the_wait(harness, listener):
    coord = harness.start(queue={"capacity": 1, "abandon_after_s": 100_000})
    first, second, third = (harness.node(u) for u in ("alice", "bob", "carol"))
    access = join(coord, first, listener.port).json()
    queued = join(coord, second, listener.port).json()
    assert queued["status"] == "queued"
    harness.clock.advance(100)
    raw, headers = first.signed_heartbeat(access["uid"], harness.clock.now, 0, 0, leaving=True)
    assert coord.http.put("/api/heartbeat", content=raw, headers=headers).status_code == 200
    nodes = {n["peer_id"]: n for n in coord.http.get("/api/nodes").json()}
    assert nodes[first.peer_id]["state"] == "left"
    assert [t["state"] for t in nodes[first.peer_id]["timeline"]] == ["queued", "starting", "left"]
    assert nodes[second.peer_id]["state"] == "starting", "the place it left went to the next in line"
    assert join(coord, third, listener.port).json()["estimated_wait_seconds"] is None  # one departure: no rate yet


def test_dashboard_is_self_contained(harness):
    coord = harness.start()
    page = coord.http.get("/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert coord.http.get("/").text == page.text
    text = page.text.replace('"http://www.w3.org/2000/svg"', "")  # SVG's namespace name: an identifier, never fetched
    for external in ("http://", "https://", "//cdn", "<link", "src="):
        assert external not in text, external
