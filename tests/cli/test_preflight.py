"""Preflight checks on chosen inputs: the tier table, the override rule, the guide's messages, real sockets."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from agora.cli import preflight as pf
from agora.cli import troubleshooting as known
from tests.cli.conftest import REPO

GB = pf.GB


@pytest.mark.parametrize("fits, config_max, batch", [(1, 8, 1), (5, 8, 5), (12, 1, 1), (64, 4, 4)])
def test_the_batch_is_what_the_plan_fits_capped_by_the_run_config(fits, config_max, batch):
    result, chosen = pf.check_vram(24 * GB, fits, config_max, None)
    assert result.status == pf.OK and chosen == batch, result


def test_small_gpu_gets_the_guides_message():
    result, batch = pf.check_vram(16 * GB, 0, 8, None)
    assert result.status == pf.FAIL and batch is None
    assert result.message == "GPU is not eligible (GPU VRAM: 16 GB)."
    assert "memory-plan" in result.fix


def test_override_may_only_lower_the_tier():
    lowered, batch = pf.check_vram(48 * GB, 4, 8, 2)
    assert lowered.status == pf.OK and batch == 2 and "lowered to 2" in lowered.message
    raised, batch = pf.check_vram(48 * GB, 4, 8, 8)
    assert raised.status == pf.FAIL and batch is None and "may only lower" in raised.fix
    cpu, batch = pf.check_cpu_batch(8, 3)
    assert cpu.status == pf.OK and batch == 3


def test_torch_version_message():
    assert pf.check_torch("2.13.0+cu128", "2.13.0").status == pf.OK
    assert pf.check_torch("2.13.1", "2.13.0").status == pf.OK  # patch releases are fine
    wrong = pf.check_torch("2.7.0+cu128", "2.13.0")
    assert wrong.status == pf.FAIL and wrong.message == "Wrong pytorch version. Please install torch 2.13"
    assert pf.pinned_version("torch", REPO / "constraints.txt")


def test_cuda_required_unless_the_run_allows_cpu():
    assert pf.check_cuda(False, allow_cpu=False).message == "CUDA is not available. Exiting run."
    assert pf.check_cuda(False, allow_cpu=False).status == pf.FAIL
    assert pf.check_cuda(False, allow_cpu=True).status == pf.OK


def test_run_configs_decide_cpu():
    from agora.config import load_run_config

    assert load_run_config("local-tiny").server.allow_cpu
    assert not load_run_config("llama-8b").server.allow_cpu


def test_ram_per_gpu():
    assert pf.check_ram(160 * GB, gpus=2, required=True).status == pf.OK
    short = pf.check_ram(120 * GB, gpus=2, required=True)
    assert short.status == pf.FAIL and short.message == "Not enough RAM: 120 GB for 2 GPU(s); the run needs 160 GB."
    assert pf.check_ram(16 * GB, gpus=1, required=False).status == pf.WARN  # CPU runs: advice only


def test_disk():
    assert pf.check_disk(Path("/x"), 100 * GB, required=True).status == pf.OK
    assert pf.check_disk(Path("/x"), 10 * GB, required=True).status == pf.FAIL


def test_port_check_against_a_real_bound_socket():
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen(1)
        port = s.getsockname()[1]
        busy = pf.check_port(port)
        assert busy.status == pf.FAIL and busy.message == f"Port {port} is already in use on this machine."
    assert pf.check_port(port).status == pf.OK  # free again once the socket is closed


def test_bandwidth_without_a_reachable_server_is_a_warning_with_a_way_forward():
    result = pf.check_bandwidth()  # the real speedtest client; this machine has no internet
    assert result.status in (pf.WARN, pf.OK)
    if result.status == pf.WARN and "not measured" in result.message:
        assert result.message.startswith(known.SPEEDTEST_UNREACHABLE.template) and "200 Mbps" in result.fix
    assert pf.check_bandwidth(lambda: 50.0).status == pf.WARN
    assert pf.check_bandwidth(lambda: 900.0).status == pf.OK


def test_seed_latency_over_real_tcp():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        [up] = pf.check_seeds((f"/ip4/127.0.0.1/tcp/{port}/p2p/QmSeed",))
        assert up.status == pf.OK and "answers in" in up.message
    [down] = pf.check_seeds((f"/ip4/127.0.0.1/tcp/{port}/p2p/QmSeed",))
    assert down.status == pf.WARN and "unreachable" in down.message
    assert pf.check_seeds(())[0].status == pf.WARN
    assert pf.seed_address("/dns4/seed.example/tcp/31337/p2p/Qm") == ("seed.example", 31337)
    assert pf.seed_address("/ip4/1.2.3.4/udp/1/quic") is None


def test_the_coordinator_check_tells_placeholder_silence_and_a_live_run_apart(tmp_path):
    import http.server
    import json
    import threading

    run_file = tmp_path / "run.json"
    for placeholder in ("https://auth.agora.example", "http://coordinator.invalid:8000", "https://example.com"):
        result = pf.check_coordinator(placeholder, run_file)
        assert result.status == pf.FAIL and placeholder in result.message and str(run_file) in result.message
        assert "--local" in result.fix
    assert pf.check_coordinator(None, run_file).status == pf.WARN

    class RunInfo(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"run_name": "r1", "stages": [{"serving": 2}, {"serving": 1}], "queue_length": 4}).encode()
            self.send_response(200 if self.path == "/api/run_info" else 404)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RunInfo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        live = pf.check_coordinator(url, run_file)
        assert live.status == pf.OK and live.message == f"run r1 at {url}: 3 node(s) serving, 4 waiting; dashboard {url}/"
    finally:
        server.shutdown()
        server.server_close()
    silent = pf.check_coordinator(url, run_file)  # nothing listens any more
    assert silent.status == pf.WARN and f"the coordinator at {url} (auth_server in {run_file}) did not answer" in silent.message
