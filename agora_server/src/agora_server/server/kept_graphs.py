"""The autograd graphs of training forwards a head or body worker keeps until their backward arrives.

With its graph kept, a micro-batch costs its worker one forward and one backward; without it, the
backward runs the forward again from the inputs the trainer sends (two forwards and one backward).
What a graph holds is what autograd saved: the layers' activations, or only each layer's input where
the stage checkpoints its layers (the memory plan decides that), plus the forward's input and output.

The store is bounded by a count and by bytes. A forward that finds it full is served without keeping
its graph, rather than evicting one: in a pipeline the oldest graphs are the next to be taken, and
evicting them would make every backward recompute once the store fills. Nor is a graph kept whose
backward is expected only after the stage's next step (``pending`` samples of training forwards
ahead of it fill what is left of the epoch): the step would make it useless, and a forward without
autograd is cheaper. Graphs are freed when their
backward takes them, when they have waited ``timeout`` seconds (their trainer gave up or is gone), and
when the weights change (an optimizer step, an averaging round): autograd can no longer run them on
the weights they were computed with. Keys hold the caller's peer id, so no caller reaches another's.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable

import torch

from agora_server.server.config import KeptGraphsConfig


PENDING_PER_GRAPH = 4
"""Training forwards awaiting their backward that the store remembers, per graph it may hold."""


@dataclasses.dataclass(frozen=True)
class GraphKey:
    caller: str
    """The peer id that sent the forward (checked by the access guard before anything is kept)."""
    session: str
    microbatch: int


@dataclasses.dataclass
class KeptGraph:
    inputs: dict[str, torch.Tensor]
    """The forward's inputs on the device; ``boundary`` requires grad (its gradient is the answer)."""
    output: torch.Tensor
    """The forward's output on the device: the root of the graph the backward runs."""
    weights_version: int
    """``MasterWeights.version`` when the forward ran."""
    nbytes: int
    """Estimated device bytes the graph holds (``bytes_per_token`` × its tokens)."""
    kept_at: float = 0.0
    forward_seconds: float = 0.0
    """How long the forward took: the backward's throughput counts it."""


@dataclasses.dataclass(frozen=True)
class KeptGraphsSnapshot:
    held: int
    bytes: int
    not_kept: int
    """Forwards served without keeping their graph: the store was full."""
    expired: int
    """Graphs freed unused after ``timeout``."""
    outdated: int
    """Graphs freed unused because the weights changed after their forward."""


class KeptGraphs:
    def __init__(self, config: KeptGraphsConfig, max_bytes: int | None, bytes_per_token: float,
                 clock: Callable[[], float] = time.monotonic):
        """``max_bytes``: the byte budget (None: none); ``bytes_per_token``: what a graph holds per token
        of its micro-batch (the memory plan's ``kept_graph_bytes_per_token``)."""
        self.max_graphs, self.max_bytes, self.timeout = config.max_graphs, max_bytes, config.timeout
        self.bytes_per_token, self.clock = bytes_per_token, clock
        self._graphs: dict[GraphKey, KeptGraph] = {}  # in the order they were kept
        self._pending: dict[GraphKey, tuple[int, float]] = {}  # training forwards awaiting their backward: (samples, when)
        self._bytes = 0
        self._not_kept = self._expired = self._outdated = 0
        self._lock = threading.Lock()  # the compute thread writes; reporters read the snapshot

    def estimate(self, tokens: int) -> int:
        return int(self.bytes_per_token * tokens)

    def room_for(self, nbytes: int) -> bool:
        """Whether a graph of ``nbytes`` would be kept now (counted as not kept when it would not)."""
        with self._lock:
            fits = len(self._graphs) < self.max_graphs and (self.max_bytes is None or self._bytes + nbytes <= self.max_bytes)
            if not fits:
                self._not_kept += 1
            return fits

    def forwarded(self, key: GraphKey, samples: int) -> int:
        """Note a training forward (kept or not) until its backward arrives or ``timeout`` passes; returns
        the samples of the training forwards noted before it that still await theirs. At most
        ``PENDING_PER_GRAPH`` × ``max_graphs`` are noted, the oldest forgotten first."""
        with self._lock:
            self._pending.pop(key, None)  # sent again: it is no longer ahead of itself
            ahead = sum(n for n, _ in self._pending.values())
            self._pending[key] = (samples, self.clock())
            while len(self._pending) > PENDING_PER_GRAPH * max(self.max_graphs, 1):
                del self._pending[next(iter(self._pending))]
            return ahead

    def keep(self, key: GraphKey, graph: KeptGraph) -> None:
        """Hold ``graph`` (call after ``room_for`` said yes, on the same thread); a graph already kept under
        ``key`` (a forward the trainer sent again) is replaced."""
        graph.kept_at = self.clock()
        with self._lock:
            old = self._graphs.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._graphs[key] = graph
            self._bytes += graph.nbytes

    def take(self, key: GraphKey) -> KeptGraph | None:
        """The graph kept under ``key``, no longer held here (None: none is); its backward has arrived."""
        with self._lock:
            self._pending.pop(key, None)
            graph = self._graphs.pop(key, None)
            if graph is not None:
                self._bytes -= graph.nbytes
            return graph

    def free_unusable(self, weights_version: int) -> int:
        """Free the graphs that waited longer than the timeout or were computed on other weights; returns
        how many were freed."""
        now = self.clock()
        with self._lock:
            expired = {k for k, g in self._graphs.items() if now - g.kept_at > self.timeout}
            outdated = {k for k, g in self._graphs.items() if g.weights_version != weights_version} - expired
            for key in (*expired, *outdated):
                self._bytes -= self._graphs.pop(key).nbytes
            for key in [k for k, (_, when) in self._pending.items() if now - when > self.timeout]:
                del self._pending[key]
            self._expired += len(expired)
            self._outdated += len(outdated)
            return len(expired) + len(outdated)

    def snapshot(self) -> KeptGraphsSnapshot:
        with self._lock:
            return KeptGraphsSnapshot(held=len(self._graphs), bytes=self._bytes, not_kept=self._not_kept,
                                      expired=self._expired, outdated=self._outdated)
