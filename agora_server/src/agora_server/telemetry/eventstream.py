"""Events as JSON lines, so that a parent process receives a child's typed events, not its wording.

A process started by a launcher that reads events (the local swarm) writes each event as one line
``{"agora_event": "<class name>", <fields>}`` instead of its console lines; the launcher decodes the
line back into the same dataclass and decides what to show. Lines that are not events (a library's
warning, a traceback) pass through as text.
"""

from __future__ import annotations

import dataclasses
import json
import math

from agora_server.telemetry import events as ev

MARKER = "agora_event"
_PREFIX = '{"' + MARKER + '"'


def _event_classes() -> dict[str, type[ev.Event]]:
    found: dict[str, type[ev.Event]] = {}
    pending = [ev.Event]
    while pending:
        cls = pending.pop()
        for sub in cls.__subclasses__():
            found[sub.__name__] = sub
            pending.append(sub)
    return found


def _plain(value):
    # JSON has no NaN or infinity: a diverged loss must still cross as a number the reader can show
    if isinstance(value, float) and not math.isfinite(value):
        return {"float": repr(value)}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _restore(value, annotation: str):
    if isinstance(value, dict) and set(value) == {"float"}:
        return float(value["float"])
    if isinstance(value, list) and annotation.startswith("tuple"):
        return tuple(value)
    return value


def encode_event(event: ev.Event) -> str:
    fields = {f.name: _plain(getattr(event, f.name)) for f in dataclasses.fields(event)}
    return json.dumps({MARKER: type(event).__name__, **fields}, separators=(",", ":"))


def decode_event(line: str) -> ev.Event | None:
    """The event a line carries; None for any other line (including events of unknown kinds)."""
    line = line.strip()
    if not line.startswith(_PREFIX):
        return None
    try:
        data = json.loads(line)
        cls = _event_classes()[data.pop(MARKER)]
    except (ValueError, KeyError, TypeError):
        return None
    known = {f.name: f for f in dataclasses.fields(cls)}
    # fields a newer writer added are dropped; a missing one without a default makes it undecodable
    values = {name: _restore(value, str(known[name].type)) for name, value in data.items() if name in known}
    try:
        return cls(**values)
    except TypeError:
        return None


def event_line(event: ev.Event) -> list[str]:
    """The event as the one line a launcher reads (``ConsolePrinter(render=event_line)`` writes them)."""
    return [encode_event(event)]
