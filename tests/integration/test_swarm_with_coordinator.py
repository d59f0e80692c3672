"""A local swarm admitted by its own coordinator: join → access with the port test, stages assigned
by need, signed heartbeats, and the coordinator's contribution record equal to each worker's own count."""

import json
import time
import urllib.request

from pathlib import Path

from agora_server.telemetry import events as ev
from agora_server.telemetry.console import console_lines
from tests.helpers.chromium import charts_in, rendered_dom, screenshot
from tests.helpers.swarms import run_trainer_to_end, wait_for_trainer_step


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as answer:
        return json.loads(answer.read())


def last_stats(swarm, name: str) -> ev.WorkerStats:
    return swarm.events_of(name, ev.WorkerStats)[-1]


def test_coordinator_admits_assigns_and_counts_what_each_worker_counts(swarm_harness):
    swarm = swarm_harness.create({"server": {"stats_interval": 1}}, steps=24, coordinator=True)
    swarm.start()
    for spec in swarm.config.stages:
        name = swarm.worker_name(spec.name, 0)
        assert swarm.wait_for(name, ev.AccessGranted, lambda e: e.username == "local-participant", timeout=5)
        assert swarm.wait_for(name, ev.ServerStarted, lambda e: e.stage == spec.name, timeout=60), "the coordinator fills stages in pipeline order"
    info = get_json(f"{swarm.coordinator_url}/api/run_info")
    assert {s["name"]: s["workers"] for s in info["stages"]} == {spec.name: 1 for spec in swarm.config.stages}
    assert run_trainer_to_end(swarm, 300) == 0

    expected = {}
    for spec in swarm.config.stages:
        stats = last_stats(swarm, swarm.worker_name(spec.name, 0))
        assert stats.samples >= 24 * swarm.config.trainer.micro_batch_size
        expected[stats.peer_id] = stats.samples
    deadline = time.monotonic() + 60
    while True:  # the work is over; the next heartbeats carry the final counts
        recorded = {c["peer_id"]: c["samples"] for c in get_json(f"{swarm.coordinator_url}/api/contributions")}
        if recorded == expected or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert recorded == expected, "the dashboard's contribution must equal the worker's own"

    head = swarm.events_of("head#0", ev.ServerStarted)[0].peer_id
    page = f"{swarm.coordinator_url}/?refresh=1&node={head}"
    dom = rendered_dom(page, swarm.log_dir / "chromium-profile")
    for spec in swarm.config.stages:
        assert spec.name in dom
    for samples in expected.values():
        assert f"{samples:,}" in dom, f"{samples:,} samples are not on the rendered dashboard"
    assert "local-participant" in dom and "your node" in dom
    # the charts hold what the running swarm reported: the trainer's losses and speed, the workers over time
    charts = charts_in(dom).with_data()
    assert {"loss", "tokens_per_second", "workers", "node_states"} <= set(charts), charts
    reports = len(swarm.events_of("trainer", ev.TrainerReport))
    validations = len(swarm.events_of("trainer", ev.ValidationMeasured))
    assert charts["loss"]["training (smoothed)"] >= reports >= 2 and charts["loss"]["validation"] == validations >= 2
    assert all(charts["workers"][spec.name] >= 2 for spec in swarm.config.stages)
    shot = screenshot(page, swarm.log_dir / "dashboard.png", swarm.log_dir / "chromium-profile")
    assert shot.stat().st_size > 20_000, "a blank page"
    assert swarm.stop() == []


def test_a_queued_newcomer_downloads_the_stage_checkpoint_while_it_waits(swarm_harness):
    # one place per stage: a fourth worker has to wait in the queue; the workers upload their state every 2 epochs
    swarm = swarm_harness.create({"server": {"checkpoint_every": 2}}, steps=400, coordinator=True, coordinator_settings={"queue": {"poll_interval_s": 1}})
    swarm.start()
    deadline = time.monotonic() + 240
    while not all(uploaded(swarm, spec.name) for spec in swarm.config.stages):
        assert time.monotonic() < deadline, "the workers never uploaded a checkpoint of every stage"
        time.sleep(1)
    newcomer = swarm.start_worker("tail", 1)
    queued = swarm.wait_for(newcomer.name, ev.AuthQueued, lambda e: e.position == 1, timeout=120)
    # text, because the guide fixes what a queued participant reads
    assert queued and console_lines(queued)[0].startswith("[AUTH] Authorization queue: position 1, estimated wait:"), queued
    assert swarm.wait_for(newcomer.name, ev.DownloadProgress, lambda e: e.bytes_done == 0, timeout=60), "the download never began"
    assert swarm.wait_for(newcomer.name, ev.DownloadComplete, timeout=120)
    assert list(Path(swarm.config.server.checkpoint_dir).glob("*/*/from-coordinator.pt")), "the weights were saved for the stage it will serve"
    assert newcomer.popen.poll() is None, "still waiting for a place"


def uploaded(swarm, stage: str) -> bool:
    try:
        # checkpoints go only to the stage's nodes and the operators; the local participant is one
        probe = urllib.request.Request(f"{swarm.coordinator_url}/api/checkpoints/{stage}",
                                       headers={"Range": "bytes=0-0", "Authorization": f"Bearer {swarm._token}"})
        with urllib.request.urlopen(probe, timeout=5) as answer:
            return answer.status == 206
    except OSError:
        return False


def test_an_operator_stops_a_worker_through_the_coordinator(swarm_harness):
    swarm = swarm_harness.create(
        {"server": {"stats_interval": 1}}, steps=400, coordinator=True, coordinator_settings={"operators": ["local-participant"]}
    )
    swarm.start()
    assert wait_for_trainer_step(swarm, 10, 240)
    peer = last_stats(swarm, "body1#0").peer_id
    request = urllib.request.Request(
        f"{swarm.coordinator_url}/api/admin/stop_node",
        data=json.dumps({"peer_id": peer, "reason": "maintenance of stage body1"}).encode(),
        headers={"Authorization": f"Bearer {swarm._token}", "Content-Type": "application/json"},
        method="POST",
    )
    assert get_json_from(request) == {"peer_id": peer, "was_active": True}
    stop = swarm.wait_for("body1#0", ev.HealthStop, timeout=60)
    # text, because the guide fixes what the stopped participant reads
    assert stop and console_lines(stop) == ["[SERVER] The coordinator asked this node to leave the run. Exiting run.",
                                            "[SERVER] Reason: The run's operators stopped this node: maintenance of stage body1"], stop
    assert swarm.process("body1#0").popen.wait(60) == 1


def get_json_from(request):
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.loads(answer.read())
