"""Telemetry: typed events and the consumers that turn them into lines.

- ``events.py``   Event dataclasses (worker and trainer) and the EventBus
- ``console.py``  console_lines (the guide's tags) and ConsolePrinter
- ``logfile.py``  open_file_log (rotating file log) and EventLogger
- ``eventstream.py``  events as JSON lines (event_line for ConsolePrinter, decode_event) for a launcher that reads its children's events
- ``metrics.py``  MetricsCollector (Prometheus families from events) and MetricsPusher (Pushgateway)
- ``health.py``   HealthConfig and HealthMonitor (rules that stop a sick worker with the guide's message)
- ``contribution.py``  the contribution figure shared by the console and the coordinator's dashboard
- ``resources.py``     RAM / VRAM samples
"""

from agora_server.telemetry.console import ConsolePrinter, console_lines
from agora_server.telemetry.events import Event, EventBus
from agora_server.telemetry.logfile import EventLogger, open_file_log

__all__ = ["ConsolePrinter", "Event", "EventBus", "EventLogger", "console_lines", "open_file_log"]
