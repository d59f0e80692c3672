"""A participant's contribution, one definition for the worker's console line and the coordinator's dashboard.

The worker reports ``heartbeat_counters`` to the coordinator; the dashboard and the worker's own
``[PROGRESS] Your contribution`` line both apply ``contribution`` to those counters, so the two
figures cannot disagree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from agora_server.telemetry.events import WorkerStats


@dataclasses.dataclass(frozen=True)
class Contribution:
    samples: int
    """Sequences whose backward this identity completed: work the stage's optimizer used."""
    tokens: int
    online_seconds: float


def heartbeat_counters(stats: WorkerStats) -> dict[str, float]:
    """The counters a worker reports: cumulative for its identity (they survive restarts through the checkpoint)."""
    return {
        "forward_batches": stats.forward_batches,
        "backward_batches": stats.backward_batches,
        "samples": stats.samples,
        "tokens": stats.tokens,
        "online_seconds": round(stats.online_seconds, 1),
    }


def contribution(counters: Mapping[str, float]) -> Contribution:
    """Forward passes alone do not count: a micro-batch whose backward never came back taught the model nothing."""
    return Contribution(
        samples=int(counters.get("samples", 0)),
        tokens=int(counters.get("tokens", 0)),
        online_seconds=float(counters.get("online_seconds", 0.0)),
    )
