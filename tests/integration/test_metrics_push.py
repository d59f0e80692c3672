"""Metrics from a running local swarm reach the real Prometheus Pushgateway with the right names,
labels and plausible values."""

import shutil
import subprocess
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agora.ports import free_port
from tests.helpers.swarms import run_trainer_to_end

STEPS = 16


@pytest.fixture
def pushgateway(tmp_path):
    binary = shutil.which("prometheus-pushgateway")
    assert binary, "prometheus-pushgateway is missing: `python3 agora_cli.py test` installs it (Debian package prometheus-pushgateway)"
    address = f"127.0.0.1:{free_port()}"
    process = subprocess.Popen(
        [binary, f"--web.listen-address={address}", f"--persistence.file={tmp_path / 'pushgateway.data'}"], stdout=subprocess.DEVNULL, stderr=open(tmp_path / "pushgateway.log", "wb")
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://{address}/-/ready", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            assert process.poll() is None, f"the pushgateway exited: {(tmp_path / 'pushgateway.log').read_text()}"
            assert time.monotonic() < deadline, "the pushgateway did not become ready in 30 s"
            time.sleep(0.2)
        yield address
    finally:
        process.terminate()
        process.wait(10)


def scrape(address: str) -> list:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples if s.name.startswith("agora_")]


def one(samples, name: str, **labels) -> float:
    found = [s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, f"{name} {labels}: {len(found)} samples"
    return found[0]


def test_swarm_metrics_arrive_grouped_by_run_stage_and_peer(swarm_harness, pushgateway):
    swarm = swarm_harness.create({"server": {"stats_interval": 1}}, steps=STEPS, prom_gateway=pushgateway)
    swarm.start()
    assert run_trainer_to_end(swarm, 300) == 0
    assert swarm.stop() == []  # every process pushes its final values as it stops
    samples = scrape(pushgateway)
    run = swarm.config.run_name
    micro_batch = swarm.config.trainer.micro_batch_size

    for spec in swarm.config.stages:
        peers = {s.labels["peer"] for s in samples if s.name == "agora_samples_total" and s.labels.get("stage") == spec.name}
        assert len(peers) == 1, f"one worker of {spec.name} pushed under its peer id: {[(x.name, x.labels, x.value) for x in samples if x.labels.get('stage') == spec.name and 'samples' in x.name]}"
        labels = {"job": "agora", "run": run, "stage": spec.name, "peer": peers.pop()}
        backward = one(samples, "agora_backward_batches_total", **labels)
        assert backward >= STEPS, "every completed micro-batch passed backward through every stage"
        assert one(samples, "agora_samples_total", **labels) == backward * micro_batch
        assert one(samples, "agora_tokens_total", **labels) == backward * micro_batch * swarm.config.data.seq_len
        if spec.kind.value != "tail":
            # the tail gets only backward calls, which recompute the forward; a backward call that timed out is
            # retried alone, so the count of forwards is bounded by completed micro-batches, not by backwards
            assert one(samples, "agora_forward_batches_total", **labels) >= STEPS
        assert one(samples, "agora_optimizer_steps_total", **labels) >= 1
        assert 0 < one(samples, "agora_ram_used_percent", **labels) <= 100
        assert one(samples, "agora_process_rss_bytes", **labels) > 10 * 2**20
        assert one(samples, "agora_throughput_tokens_per_second", **labels) > 0
        # every stage answers forward calls with activations, except the tail, whose backward answers carry the gradients
        answered = "backward" if spec.kind.value == "tail" else "forward"
        assert one(samples, "agora_bytes_sent_total", rpc=answered, **labels) > 0
        assert one(samples, "agora_bytes_received_total", rpc="backward", **labels) > 0
        assert one(samples, "agora_averaging_rounds_total", result="failed", **labels) == 0, "alone on a stage: no rounds, no failures"

    trainer = {"job": "agora", "run": run, "stage": "trainer"}
    assert one(samples, "agora_trainer_micro_batches_total", outcome="completed", **trainer) == STEPS
    assert 0 < one(samples, "agora_trainer_loss", **trainer) < 12
