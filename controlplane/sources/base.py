"""Source protocol (the events themselves are model data: controlplane.model.events, re-exported
here). Pure data plus a Protocol.

A source owns one or more *origins* (a file, a cluster). It reports either a whole
origin's object set (`Replace`, used by the directory source) or single-object changes
(`Upsert`/`Delete`, used by watches), and `Synced` once its first full view is delivered.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from controlplane.model.events import Delete, ParseError, Replace, SourceEvent, Synced, Upsert

Sink = Callable[[list[SourceEvent]], Awaitable[None]]


__all__ = ["Delete", "ParseError", "Replace", "Sink", "Source", "SourceEvent", "Synced", "Upsert"]


class Source(Protocol):
    name: str

    async def run(self, sink: Sink) -> None:
        """Deliver the initial state, then `Synced`, then changes until cancelled."""
        ...
