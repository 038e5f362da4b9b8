"""The clock tests give the Store: its test-only replacement for Redis TIME in the scripts."""

from __future__ import annotations

T0 = 1_700_000_000


class Clock:
    """The time (whole seconds) the scripts see; tests move it on."""

    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: int) -> None:
        self.now += seconds
