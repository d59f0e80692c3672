"""A clock a test moves by hand: passed where code takes a ``clock`` callable, so that time passes
without sleeping."""

from __future__ import annotations


class ManualClock:
    def __init__(self, now: float = 0.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
