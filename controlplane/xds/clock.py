"""The clock the xDS stream state machine reads, injected: `AdsStream` never reads time
itself. The gRPC server passes `wall_clock`; tests pass a clock they advance by hand."""

from __future__ import annotations

import time
from collections.abc import Callable

Clock = Callable[[], float]
"""Seconds since the epoch (or any origin, consistently): timestamps shown by status
(`last_push`, `last_ack`, a NACK's `at`, `connected_at`) and the warming deadline."""


def wall_clock() -> float:
    return time.time()


class ManualClock:
    """A clock that moves only when told (`advance`): for tests of the state machine."""

    __slots__ = ("now",)

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
