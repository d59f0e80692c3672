"""The coordinator's Prometheus metrics, served at ``/metrics``.

State (nodes per stage, queue, contribution and admission totals) is read from the database at
scrape time, so it is right after a restart; what only this process sees (refusals, heartbeats,
checkpoint uploads) is counted here. Each app has its own registry, so several coordinators in
one process (tests) do not share counters.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from agora.coordinator.service import Coordinator

PREFIX = "agora_coordinator"


class CoordinatorMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, coordinator: Coordinator):
        self.registry = CollectorRegistry(auto_describe=False)
        self.refusals = Counter(f"{PREFIX}_refusals", "Requests refused, by refusal code", ["reason"], registry=self.registry)
        self.heartbeats = Counter(f"{PREFIX}_heartbeats", "Signed heartbeats accepted", registry=self.registry)
        self.checkpoint_uploads = Counter(f"{PREFIX}_checkpoint_uploads", "Checkpoint uploads stored, by stage",
                                          ["stage"], registry=self.registry)
        self.registry.register(_StateCollector(coordinator))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector:
    def __init__(self, coordinator: Coordinator):
        self._coordinator = coordinator

    def collect(self):
        info = self._coordinator.run_info()
        totals = self._coordinator.totals()
        stages = [stage.name for stage in info.stages]

        active = GaugeMetricFamily(f"{PREFIX}_active_nodes", "Nodes holding access, by stage", labels=["stage"])
        need = GaugeMetricFamily(f"{PREFIX}_stage_need", "Workers each stage should have", labels=["stage"])
        for stage in info.stages:
            active.add_metric([stage.name], stage.workers)
            need.add_metric([stage.name], stage.need)
        yield active
        yield need
        yield GaugeMetricFamily(f"{PREFIX}_queue_length", "Join requests waiting", value=info.queue_length)
        yield GaugeMetricFamily(f"{PREFIX}_capacity", "Active nodes the run admits", value=info.capacity)
        yield GaugeMetricFamily(f"{PREFIX}_joins_paused", "1 while joins are paused", value=int(info.joins_paused))
        if info.estimated_wait_seconds is not None:  # none while paused: no number is better than a made-up one
            yield GaugeMetricFamily(f"{PREFIX}_estimated_wait_seconds", "Wait a node joining now can expect",
                                    value=info.estimated_wait_seconds)

        yield _per_label(f"{PREFIX}_admissions", "Join requests admitted since the run began, by stage", "stage",
                         {s: totals.admissions.get(s, 0) for s in stages})
        yield _per_label(f"{PREFIX}_queue_drops", "Join requests dropped from the queue, by reason", "reason",
                         totals.queue_drops)
        yield _per_label(f"{PREFIX}_samples", "Samples processed by the run's nodes, by stage", "stage",
                         {s: totals.samples.get(s, 0) for s in stages})
        yield _per_label(f"{PREFIX}_tokens", "Tokens processed by the run's nodes, by stage", "stage",
                         {s: totals.tokens.get(s, 0) for s in stages})


def _per_label(name: str, documentation: str, label: str, values: dict[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=[label])
    for key, value in values.items():
        family.add_metric([key], value)
    return family
