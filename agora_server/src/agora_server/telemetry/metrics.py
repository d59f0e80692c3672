"""Prometheus metrics from events, pushed to the run's Pushgateway.

``MetricsCollector`` is an EventBus subscriber and a Prometheus collector at once: it keeps the
latest ``WorkerStats`` / ``TrainerReport`` and turns them into metric families when scraped, so
counters carry the worker's own cumulative values (which survive restarts through its checkpoint).
``MetricsPusher`` pushes them every ``interval`` seconds under the grouping key run / stage / peer,
and once more when it stops.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, push_to_gateway
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from agora_server.telemetry import events as ev

logger = logging.getLogger(__name__)

PUSH_JOB = "agora"


class MetricsCollector:
    def __init__(self) -> None:
        self._stats: ev.WorkerStats | None = None
        self._trainer: ev.TrainerReport | None = None
        self._lock = threading.Lock()

    def __call__(self, event: ev.Event) -> None:
        if isinstance(event, ev.WorkerStats):
            with self._lock:
                self._stats = event
        elif isinstance(event, ev.TrainerReport):
            with self._lock:
                self._trainer = event
        elif isinstance(event, ev.TrainerFinished):
            # the ledger's final figures, which the last periodic report may predate (or a run too
            # short for any report may never have had)
            with self._lock:
                last = self._trainer or ev.TrainerReport(step=event.completed, loss=float("nan"), tokens_per_second=0.0,
                                                         sent=0, completed=0, dropped=0, retried=0)
                self._trainer = dataclasses.replace(
                    last,
                    sent=event.sent,
                    completed=event.completed,
                    dropped=sum(event.dropped.values()),
                    retried=event.retried,
                    loss=last.loss if event.final_loss is None else event.final_loss,
                    kept_graph_backwards=event.kept_graph_backwards,
                    recomputed_backwards=event.recomputed_backwards,
                    graph_resends=event.graph_resends,
                )

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            stats, trainer = self._stats, self._trainer
        if stats is not None:
            yield from worker_metrics(stats)
        if trainer is not None:
            yield from trainer_metrics(trainer)

    def registry(self) -> CollectorRegistry:
        registry = CollectorRegistry(auto_describe=True)
        registry.register(self)
        return registry


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def worker_metrics(s: ev.WorkerStats) -> Iterator[Metric]:
    yield _counter("agora_forward_batches", "Forward micro-batches served", s.forward_batches)
    yield _counter("agora_backward_batches", "Backward micro-batches served", s.backward_batches)
    yield _counter("agora_samples", "Sequences whose backward completed (the contribution)", s.samples)
    yield _counter("agora_tokens", "Tokens whose backward completed", s.tokens)
    yield _counter("agora_optimizer_steps", "Optimizer steps taken", s.optimizer_steps)
    yield _counter("agora_skipped_steps", "Epochs whose gradients were not finite (step skipped)", s.skipped_steps)
    yield _gauge("agora_epoch", "The stage epoch this worker is in", s.epoch)
    yield _gauge("agora_throughput_tokens_per_second", "Forward+backward tokens per second (moving average)", s.throughput)
    rounds = CounterMetricFamily("agora_averaging_rounds", "SPARTA averaging rounds by result", labels=["result"])
    rounds.add_metric(["ok"], s.rounds_ok)
    rounds.add_metric(["failed"], s.rounds_failed)
    yield rounds
    yield _gauge("agora_averaging_group_size", "Peers in the last successful averaging round", s.last_group_size)
    for direction, by_rpc in (("sent", s.bytes_sent), ("received", s.bytes_received)):
        family = CounterMetricFamily(f"agora_bytes_{direction}", f"Payload bytes {direction} per RPC kind", labels=["rpc"])
        for rpc, count in sorted(by_rpc.items()):
            family.add_metric([rpc], count)
        yield family
    graphs = CounterMetricFamily("agora_backward_graphs", "Head/body backwards by how they ran: on the graph their forward kept, "
                                 "or recomputing the forward", labels=["graph"])
    graphs.add_metric(["kept"], s.kept_graph_backwards)
    graphs.add_metric(["recomputed"], s.recomputed_backwards)
    yield graphs
    yield _gauge("agora_kept_graphs", "Micro-batch graphs held for their backward", s.graphs_held)
    yield _gauge("agora_kept_graph_bytes", "Estimated device bytes the held graphs keep", s.graph_bytes)
    yield _gauge("agora_ram_used_percent", "System RAM in use, percent", s.ram_used_percent)
    yield _gauge("agora_process_rss_bytes", "Resident memory of the worker process", s.process_rss_bytes)
    if s.vram_allocated_bytes is not None:
        yield _gauge("agora_vram_allocated_bytes", "GPU memory allocated by torch", s.vram_allocated_bytes)
    yield _counter("agora_online_seconds", "Seconds this identity has served", s.online_seconds)


def trainer_metrics(r: ev.TrainerReport) -> Iterator[Metric]:
    yield _gauge("agora_trainer_loss", "Mean training loss of the last report window", r.loss)
    yield _gauge("agora_trainer_tokens_per_second", "Tokens per second through the whole pipeline", r.tokens_per_second)
    micro = CounterMetricFamily("agora_trainer_micro_batches", "Micro-batches by outcome", labels=["outcome"])
    for outcome, count in (("sent", r.sent), ("completed", r.completed), ("dropped", r.dropped), ("retried", r.retried)):
        micro.add_metric([outcome], count)
    yield micro
    backwards = CounterMetricFamily("agora_trainer_backwards", "Head/body backwards by how the worker ran them: on the graph "
                                    "the forward kept, recomputed, or resent with the inputs after the graph was gone", labels=["graph"])
    for graph, count in (("kept", r.kept_graph_backwards), ("recomputed", r.recomputed_backwards), ("resent", r.graph_resends)):
        backwards.add_metric([graph], count)
    yield backwards


class MetricsPusher:
    """Pushes a registry every ``interval`` seconds; a gateway that cannot be reached is logged, not fatal."""

    def __init__(self, gateway: str, grouping_key: dict[str, str], registry: CollectorRegistry, interval: float = 15.0):
        self.gateway, self.grouping_key, self.registry, self.interval = gateway, grouping_key, registry, interval
        self.pushes = self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="metrics-push", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def push(self) -> bool:
        try:
            push_to_gateway(self.gateway, job=PUSH_JOB, registry=self.registry, grouping_key=self.grouping_key, timeout=10)
        except Exception as e:  # OSError, HTTP errors: metrics must never take a worker down
            self.failures += 1
            if self.failures == 1 or self.failures % 20 == 0:
                logger.warning("could not push metrics to %s (%d failures so far): %s", self.gateway, self.failures, e)
            return False
        self.pushes += 1
        return True

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.push()

    def stop(self) -> None:
        """Push the final values, then stop."""
        self._stop.set()
        self._thread.join(self.interval + 15)
        self.push()
