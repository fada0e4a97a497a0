"""Source protocol and the change events sources emit. Pure data plus a Protocol.

A source owns one or more *origins* (a file, a cluster). It reports either a whole
origin's object set (`Replace`, used by the directory source) or single-object changes
(`Upsert`/`Delete`, used by watches), and `Synced` once its first full view is delivered.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from controlplane.model.raw import ObjectKey, RawObject
from controlplane.sources.yamlload import ParseError


@dataclass(frozen=True, slots=True)
class Replace:
    origin: str
    objects: tuple[RawObject, ...] | None  # None: keep the origin's previous objects
    errors: tuple[ParseError, ...] = ()


@dataclass(frozen=True, slots=True)
class Upsert:
    origin: str
    obj: RawObject


@dataclass(frozen=True, slots=True)
class Delete:
    origin: str
    key: ObjectKey


@dataclass(frozen=True, slots=True)
class Synced:
    source: str


SourceEvent = Replace | Upsert | Delete | Synced
Sink = Callable[[list[SourceEvent]], Awaitable[None]]


class Source(Protocol):
    name: str

    async def run(self, sink: Sink) -> None:
        """Deliver the initial state, then `Synced`, then changes until cancelled."""
        ...
