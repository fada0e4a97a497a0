"""Garbage-collector policy for a long-running control plane. No I/O.

The model, the snapshots and every stream's state are millions of long-lived objects.
CPython's cyclic collector scans all of them in each full collection, and the churn of a
fan-out (a response, its pending record, the ACK) promotes enough objects to start one
every few changes: ~160 ms each at 1,000 services x 1,000 proxies, most of a change's cost.

So after each full rebuild the heap is frozen (`gc.freeze()`: the collector stops scanning
what exists now; objects freed by reference counting are still freed at once), and a
maintenance pass, when the control plane is idle, unfreezes, collects everything once (so
cycles among frozen objects are not kept forever) and freezes again.
"""

from __future__ import annotations

import gc
import time

# Young collections every 50,000 net allocations instead of 700: a change's short-lived
# objects die by reference counting before a collection sees them.
THRESHOLDS = (50_000, 20, 100)


class GcPolicy:
    def __init__(self, maintenance_every_s: float = 300.0) -> None:
        self.maintenance_every_s = maintenance_every_s
        self.last_maintenance = time.monotonic()
        self.freezes = 0
        self.maintenances = 0

    def install(self) -> None:
        gc.set_threshold(*THRESHOLDS)

    def after_full_rebuild(self) -> None:
        """What exists after a full rebuild lives until the next one: stop scanning it."""
        gc.freeze()
        self.freezes += 1

    def maintain(self, now: float | None = None) -> bool:
        """When idle: one full collection of everything (then freeze again), at most every
        `maintenance_every_s`. Returns whether it ran."""
        now = time.monotonic() if now is None else now
        if now - self.last_maintenance < self.maintenance_every_s:
            return False
        self.last_maintenance = now
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        self.maintenances += 1
        return True
