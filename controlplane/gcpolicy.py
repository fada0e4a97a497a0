"""Garbage-collector policy for a long-running control plane. No I/O.

The model, the snapshots and every stream's state are millions of long-lived objects.
CPython's cyclic collector scans all of them in each full collection, and the churn of a
fan-out (a response, its pending record, the ACK) promotes enough objects to start one
every few changes: ~160 ms each at 1,000 services x 1,000 proxies, most of a change's cost.

So once the control plane has settled after a full rebuild (no other full rebuild for
`settle_after_s`), it collects everything once and freezes what survives (`gc.freeze()`): later collections
no longer scan it, and objects freed by reference counting are still freed at once. Only
reference cycles among frozen objects wait for the next settle pass, which also runs every
`every_s` while idle. Freezing right after each rebuild instead would freeze the garbage
of the rebuilds around it (a burst of connecting proxies rebuilds many times): the heap
grew 2.5x that way.
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger(__name__)


# Young collections every 50,000 net allocations instead of 700: most objects of a fan-out
# (responses, requests, futures) die by reference counting before a collection would scan them.
THRESHOLDS = (50_000, 20, 10)


class GcPolicy:
    def __init__(self, settle_after_s: float = 1.0, every_s: float = 300.0) -> None:
        self.settle_after_s = settle_after_s
        self.every_s = every_s
        self.due: float | None = None  # when a settle pass is due (monotonic)
        self.last = time.monotonic()
        self.passes = 0
        self.last_pass_s = 0.0
        self.last_collected = 0

    def install(self) -> None:
        gc.set_threshold(*THRESHOLDS)

    def after_full_rebuild(self, now: float | None = None, streams: int = 1) -> None:
        """A full rebuild replaced most long-lived objects: settle `settle_after_s` after the
        last one of a burst (endpoint-only patches in between do not postpone it), or at
        once when no proxy is connected (at startup: a pass then delays nobody's config)."""
        self.due = (time.monotonic() if now is None else now) + (self.settle_after_s if streams else 0.0)

    def maybe_settle(self, busy: bool, now: float | None = None) -> bool:
        """Run the settle pass (full collection, then freeze) when one is due, or every
        `every_s`, unless a rebuild is pending (`busy`) and the last pass is less than
        2 x `every_s` old. Returns whether it ran."""
        now = time.monotonic() if now is None else now
        due = (self.due is not None and now >= self.due) or now - self.last >= self.every_s
        overdue = now - self.last >= 2 * self.every_s  # steady churn must not postpone it forever
        if not due or (busy and not overdue):
            return False
        t0 = time.perf_counter()
        gc.unfreeze()
        self.last_collected = gc.collect()
        gc.freeze()
        self.last_pass_s = time.perf_counter() - t0
        self.due, self.last = None, now
        self.passes += 1
        log.debug("GC settle pass: %d unreachable objects freed, %d frozen, %.0f ms", self.last_collected,
                  gc.get_freeze_count(), self.last_pass_s * 1000)
        return True
