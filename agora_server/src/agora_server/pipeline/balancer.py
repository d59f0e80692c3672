"""Per-stage choice of worker: the one expected to finish a new task first (SWARM-style).

Expected finish = (tokens already sent to it and not yet returned + new tokens) / throughput,
with throughput an EMA of what this trainer measured, seeded from the worker's DHT record.
Failed workers (and workers that refuse a request) are banned for a while, longer each time they
fail again; a worker that announces a new start time has restarted, and its record of failures is
forgotten. A throughput a worker announces is believed only up to a bound until it is measured.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable

from agora_server.wire import ServerPhase, StageServerInfo


@dataclasses.dataclass
class PeerState:
    throughput: float
    measured: bool = False
    inflight_tokens: int = 0
    banned_until: float = 0.0
    consecutive_failures: int = 0
    listed: bool = True
    """Whether the latest DHT read still lists it as online."""
    started_at: float = 0.0


class StageBalancer:
    def __init__(
        self,
        stage: str,
        *,
        default_throughput: float,
        unmeasured_claim_factor: float = 10.0,
        ban_seconds: float,
        ban_max_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.stage, self.default_throughput, self.unmeasured_claim_factor = stage, default_throughput, unmeasured_claim_factor
        self.ban_seconds, self.ban_max_seconds, self.clock = ban_seconds, ban_max_seconds, clock
        self.peers: dict[str, PeerState] = {}

    def update_peers(self, records: dict[str, StageServerInfo]) -> None:
        for peer_id, info in records.items():
            state = self.peers.get(peer_id)
            if state is None or info.started_at != state.started_at:
                # new, or restarted since we last looked: what failed before was the old process
                state = self.peers[peer_id] = PeerState(throughput=info.throughput, started_at=info.started_at)
            elif not state.measured:
                state.throughput = info.throughput
            state.listed = info.phase is ServerPhase.ONLINE
        for peer_id, state in self.peers.items():
            if peer_id not in records:
                state.listed = False

    def expected_throughput(self, peer_id: str) -> float:
        """What this trainer measured; for a worker it has not measured yet, at least the best rate measured
        on the stage, so it gets tried (a pessimistic guess would starve it of the very work that would
        measure it), and what it announces only up to ``unmeasured_claim_factor`` times that best rate
        (or the default): an announcement is the worker's word, not a measurement."""
        state = self.peers[peer_id]
        if state.measured:
            return state.throughput
        best = max((s.throughput for s in self.peers.values() if s.measured), default=0.0)
        claimed = min(state.throughput or self.default_throughput, self.unmeasured_claim_factor * max(best, self.default_throughput))
        return max(best, claimed)

    def usable(self) -> list[str]:
        now = self.clock()
        return [p for p, s in self.peers.items() if s.listed and s.banned_until <= now]

    def choose(self, tokens: int, exclude: Iterable[str] = ()) -> str | None:
        excluded = set(exclude)
        candidates = [p for p in self.usable() if p not in excluded] or self.usable()
        if not candidates:
            return None
        best = min(candidates, key=lambda p: (self.peers[p].inflight_tokens + tokens) / self.expected_throughput(p))
        self.peers[best].inflight_tokens += tokens
        return best

    def claim(self, peer_id: str, tokens: int) -> bool:
        """Give a task to this worker (the one that holds what the task needs) if it is usable now."""
        if peer_id not in self.usable():
            return False
        self.peers[peer_id].inflight_tokens += tokens
        return True

    def succeeded(self, peer_id: str, tokens: int, elapsed: float) -> None:
        state = self._release(peer_id, tokens)
        state.consecutive_failures = 0
        rate = max(tokens / max(elapsed, 1e-6), 1e-3)  # never zero: it divides expected finish times
        state.throughput = rate if not state.measured else 0.7 * state.throughput + 0.3 * rate
        state.measured = True

    def failed(self, peer_id: str, tokens: int) -> float:
        """Release the task and ban the worker; return the ban length in seconds."""
        state = self._release(peer_id, tokens)
        state.consecutive_failures += 1
        seconds = min(self.ban_seconds * 2 ** (state.consecutive_failures - 1), self.ban_max_seconds)
        state.banned_until = self.clock() + seconds
        return seconds

    def released(self, peer_id: str, tokens: int) -> None:
        """The task ended without judging the worker (e.g. the request itself was refused)."""
        self._release(peer_id, tokens)

    def _release(self, peer_id: str, tokens: int) -> PeerState:
        state = self.peers[peer_id]
        state.inflight_tokens = max(0, state.inflight_tokens - tokens)
        return state
