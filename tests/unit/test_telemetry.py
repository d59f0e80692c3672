"""Consumers of the typed events: health rules, Prometheus families, the contribution figure."""

import dataclasses

import pytest
import torch
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agora_server.server.handler import is_cuda_failure
from agora_server.telemetry import events as ev
from agora_server.telemetry.console import console_lines
from agora_server.telemetry.contribution import contribution, heartbeat_counters
from agora_server.telemetry.health import (
    ALLREDUCE_MESSAGE,
    COORDINATOR_MESSAGE,
    CUDA_MESSAGE,
    RAM_MESSAGE,
    HealthConfig,
    HealthMonitor,
)
from agora_server.telemetry.metrics import MetricsCollector
from tests.helpers.clock import ManualClock


def stats(**changes) -> ev.WorkerStats:
    base = ev.WorkerStats(
        stage="body1",
        peer_id="QmPeer",
        epoch=3,
        forward_batches=10,
        backward_batches=8,
        samples=32,
        tokens=4096,
        optimizer_steps=3,
        skipped_steps=0,
        throughput=512.0,
        rounds_ok=2,
        rounds_failed=1,
        last_group_size=2,
        bytes_received={"forward": 1000, "backward": 2000},
        bytes_sent={"forward": 900},
        ram_used_percent=40.0,
        process_rss_bytes=10**9,
        vram_allocated_bytes=None,
        online_seconds=12.5,
    )
    return dataclasses.replace(base, **changes)


def monitor(**config):
    emitted, stopped = [], []
    clock = ManualClock()
    health = HealthMonitor(HealthConfig(**config), emitted.append, stopped.append, clock=clock)
    return health, emitted, stopped, clock


def test_ram_over_threshold_stops_with_the_guides_message():
    health, emitted, stopped, _ = monitor(max_ram_percent=90)
    health(stats(ram_used_percent=89.9))
    assert not stopped
    health(stats(ram_used_percent=93.0))
    assert [v.message for v in stopped] == [RAM_MESSAGE]
    assert emitted == stopped, "the verdict is also an event, for the log and the console"
    assert console_lines(stopped[0])[0] == f"[SERVER] {RAM_MESSAGE}"


def round_event(ok, attempted=True, partner_online=True):
    return ev.AveragingRound(stage="body1", epoch=4, slice_index=0, ok=ok, group_size=2 if ok else 0, reason="" if ok else "timeout",
                             attempted=attempted, partner_online=partner_online)


def test_rounds_that_failed_with_nobody_left_on_the_stage_never_stop_the_last_worker():
    health, _, stopped, _ = monitor(max_failed_rounds=3, failed_rounds_window=4)
    for _ in range(100):  # its partner has left: every round finds nobody
        health(round_event(False, partner_online=False))
    assert not stopped
    for _ in range(3):  # a partner is back and the rounds still fail: that is this worker's problem
        health(round_event(False))
    assert [v.message for v in stopped] == [ALLREDUCE_MESSAGE]


def test_failed_rounds_count_within_a_window_and_skipped_rounds_do_not_count():
    health, _, stopped, _ = monitor(max_failed_rounds=3, failed_rounds_window=4)
    for ok in (False, True, False, True, True):  # 2 failures, then they slide out of the window
        health(round_event(ok))
    for _ in range(5):
        health(round_event(False, attempted=False))  # rounds too frequent: not the network's fault
    assert not stopped
    for ok in (False, False, False):
        health(round_event(ok))
    assert [v.message for v in stopped] == [ALLREDUCE_MESSAGE]


def test_non_finite_gradients_stop_only_when_consecutive():
    health, _, stopped, _ = monitor(max_non_finite_steps=3)
    bad = ev.NonFiniteGradients(stage="body1", grad_norm=float("inf"))
    good = ev.OptimizerStepped(stage="body1", step=5, grad_norm=0.5, lr=1e-3)
    for event in (bad, bad, good, bad, bad):
        health(event)
    assert not stopped
    health(bad)
    assert len(stopped) == 1 and "3 optimizer steps in a row" in stopped[0].message


def test_no_progress_counts_from_the_last_change_of_the_counters():
    health, _, stopped, clock = monitor(no_progress_seconds=100)
    health(stats())
    clock.now = 90
    health(stats(forward_batches=11))  # work happened: the idle clock restarts
    clock.now = 180
    health.check_idle()
    assert not stopped
    clock.now = 191
    health(stats(forward_batches=11))
    assert len(stopped) == 1 and stopped[0].rule == "no_progress" and "No training progress for 101s" in stopped[0].message


def test_cuda_failures_and_the_coordinator_stop_the_worker_once():
    health, emitted, stopped, _ = monitor()
    health(ev.ComputeFailed(stage="body1", rpc="forward", error="ValueError: bad", cuda=False))
    assert not stopped
    health(ev.ComputeFailed(stage="body1", rpc="forward", error="RuntimeError: CUDA error: an illegal memory access", cuda=True))
    health(ev.CoordinatorStop(reason="revoked"))
    assert [v.message for v in stopped] == [CUDA_MESSAGE], "the first rule to fire explains the exit"
    other, _, stopped_by_coordinator, _ = monitor()
    other(ev.CoordinatorStop(reason="access revoked by the operator"))
    assert stopped_by_coordinator[0].message == COORDINATOR_MESSAGE
    assert stopped_by_coordinator[0].detail == "access revoked by the operator"


def test_out_of_memory_is_shown_in_the_guides_words_and_stops_nothing():
    from agora.cli.troubleshooting import match_line
    from agora_server.server.backend import OUT_OF_MEMORY

    health, _, stopped, _ = monitor()
    event = ev.ComputeFailed(
        stage="tail", rpc="backward", error=f"{OUT_OF_MEMORY}: a micro-batch of this size does not fit", cuda=False, out_of_memory=True
    )
    health(event)
    assert not stopped, "a dropped micro-batch is not a reason to stop"
    (line,) = console_lines(event)
    assert line.startswith("[SERVER] CUDA out of memory") and match_line(line).key == "cuda_oom"
    assert console_lines(ev.ComputeFailed(stage="tail", rpc="backward", error="ValueError: bad", cuda=False)) == []


def test_the_memory_plan_line_warns_when_the_gpu_is_too_small_for_the_batch():
    gib = 2**30
    planned = dict(stage="tail", vram_bytes=24 * gib, peak_bytes=int(19.5 * gib), host_bytes=50 * gib, batch=2, seq_len=4096, checkpointing=True)
    (line,) = console_lines(ev.MemoryPlanned(**planned, max_batch=5))
    assert line == ("[SERVER] Memory plan for stage tail: 19.5 GiB of this GPU's 24.0 GiB at micro-batch 2 x 4096 tokens, "
                    "activations checkpointed (recomputed in the backward); 50 GiB of host memory")
    _, warning = console_lines(ev.MemoryPlanned(**planned, max_batch=1))
    assert "at most 1" in warning and "--batch_size_override 1" in warning


def test_cuda_failure_classification():
    assert is_cuda_failure(RuntimeError("CUDA error: device-side assert triggered"))
    assert is_cuda_failure(RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling cublasSgemm"))
    assert not is_cuda_failure(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not is_cuda_failure(ValueError("CUDA error"))
    assert not is_cuda_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_health_config_rejects_a_window_smaller_than_its_limit():
    with pytest.raises(ValueError, match="failed_rounds_window"):
        HealthConfig(max_failed_rounds=5, failed_rounds_window=3)


def test_metrics_carry_the_worker_counters_with_prometheus_names():
    collector = MetricsCollector()
    registry = collector.registry()
    assert generate_latest(registry) == b"", "nothing to report before the first snapshot"
    collector(stats())
    collector(ev.TrainerReport(step=20, loss=5.5, tokens_per_second=900.0, sent=22, completed=20, dropped=1, retried=2))
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for s in family.samples
    }
    assert samples[("agora_samples_total", ())] == 32
    assert samples[("agora_backward_batches_total", ())] == 8
    assert samples[("agora_averaging_rounds_total", (("result", "failed"),))] == 1
    assert samples[("agora_bytes_received_total", (("rpc", "backward"),))] == 2000
    assert samples[("agora_throughput_tokens_per_second", ())] == 512.0
    assert samples[("agora_trainer_micro_batches_total", (("outcome", "completed"),))] == 20
    assert samples[("agora_trainer_loss", ())] == 5.5
    assert ("agora_vram_allocated_bytes", ()) not in samples, "no GPU, no VRAM gauge"


def test_a_run_too_short_for_any_report_still_exports_the_trainers_final_ledger():
    collector = MetricsCollector()
    registry = collector.registry()
    collector(ev.TrainerFinished(completed=16, sent=16, dropped={"failed:tail": 1}, retried=0, final_loss=8.7))
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for s in family.samples
    }
    assert samples[("agora_trainer_micro_batches_total", (("outcome", "completed"),))] == 16
    assert samples[("agora_trainer_micro_batches_total", (("outcome", "dropped"),))] == 1
    assert samples[("agora_trainer_loss", ())] == 8.7


def test_contribution_is_the_same_figure_from_the_worker_and_from_its_heartbeat():
    snapshot = stats(samples=1234, tokens=157952, forward_batches=999)
    counters = heartbeat_counters(snapshot)
    assert contribution(counters).samples == 1234, "forward passes alone do not count"
    assert contribution(counters).tokens == 157952
    line = console_lines(
        ev.ProgressReport(stage="body1", window_seconds=60, forward_batches=3, backward_batches=2, total_samples=1234, contribution_samples=contribution(counters).samples)
    )[-1]
    assert line == "[PROGRESS] Your contribution: 1234 samples"


def test_the_grafana_dashboard_queries_only_metrics_the_code_exports():
    import json
    import re
    from pathlib import Path

    from agora_server.telemetry.metrics import trainer_metrics, worker_metrics

    dashboard = json.loads((Path(__file__).resolve().parents[2] / "ops" / "grafana" / "agora-run.json").read_text())
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\bagora_[a-z_]+", target["expr"])
    }
    report = ev.TrainerReport(step=1, loss=1.0, tokens_per_second=1.0, sent=1, completed=1, dropped=0, retried=0)
    families = [*worker_metrics(stats(vram_allocated_bytes=1)), *trainer_metrics(report)]
    exported = {sample.name for family in families for sample in family.samples}
    assert queried and queried <= exported, f"not exported: {sorted(queried - exported)}"
