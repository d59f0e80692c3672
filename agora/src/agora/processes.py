"""What every Agora process sets up the same way: where logs go, and how signals stop it."""

from __future__ import annotations

import logging
import os
import sys

from agora.signals import stop_on_signals
from agora_server.telemetry import ConsolePrinter, EventBus, EventLogger, open_file_log

__all__ = ["EVENT_STREAM_ENV", "setup_process", "start_metrics_push", "stop_on_signals"]

EVENT_STREAM_ENV = "AGORA_EVENT_STREAM"
"""Set to 1 by a launcher that reads its children's events (the local swarm): stdout then carries
each event as a JSON line (``agora_server.telemetry.eventstream``) instead of its console lines."""


def setup_process(log_file: str | None) -> EventBus:
    """Console gets the tagged event lines (or the events themselves, for a launcher that reads them);
    the file gets everything, hivemind's logs included."""
    from hivemind.utils.logging import use_hivemind_log_handler

    use_hivemind_log_handler("in_root_logger")
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    if log_file:
        open_file_log(log_file)
    else:
        stderr = logging.StreamHandler(sys.stderr)
        stderr.setLevel(logging.WARNING)
        root.addHandler(stderr)
    events = EventBus()
    events.subscribe(EventLogger())  # the file first: when a console line shows, the record is written
    if os.environ.get(EVENT_STREAM_ENV) == "1":
        from agora_server.telemetry.eventstream import event_line

        events.subscribe(ConsolePrinter(render=event_line))
    else:
        events.subscribe(ConsolePrinter())
    return events


def start_metrics_push(events, gateway: str | None, config, stage: str, peer_id: str):
    """Push this process's metrics to the run's Pushgateway, if it has one."""
    if not gateway:
        return None
    from agora_server.telemetry.metrics import MetricsCollector, MetricsPusher

    collector = MetricsCollector()
    events.subscribe(collector)
    grouping = {"run": config.run_name, "stage": stage, "peer": peer_id}
    pusher = MetricsPusher(gateway, grouping, collector.registry(), interval=config.server.stats_interval)
    pusher.start()
    return pusher
