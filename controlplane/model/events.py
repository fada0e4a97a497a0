"""The change events sources emit and the store consumes, and the parse errors they carry.
Pure data, no I/O. (They live in the model layer so that the store never imports a source.)

A source owns one or more *origins* (a file, a cluster). It reports either a whole
origin's object set (`Replace`, used by the directory source) or single-object changes
(`Upsert`/`Delete`, used by watches), and `Synced` once its first full view is delivered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from controlplane.model.raw import ObjectKey, RawObject


@dataclass(frozen=True, slots=True)
class ParseError:
    """A document that could not be read at all (YAML syntax, not a mapping, no kind), or a
    note about a whole file (`severity` "warning": the file is read, e.g. it was emptied).

    `fatal`: the file could not be read whole (a syntax error ends the YAML stream, a limit
    refused it): its previous objects should keep serving instead of this file's partial
    content."""

    file: str
    line: int
    message: str
    fatal: bool = False
    severity: Literal["error", "warning"] = "error"  # a warning: e.g. a file emptied (its objects removed)

    def format(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


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
