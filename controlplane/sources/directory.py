"""Directory source: YAML files under one or more directories. Does file I/O.

Each file is an origin. A file that fails to parse as YAML keeps its previous objects
(reported as an error); a removed file removes its objects. Changes are watched with
`watchfiles` (inotify), not a polling loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import watchfiles

from controlplane.sources.base import Replace, Sink, SourceEvent, Synced
from controlplane.sources.yamlload import ParseError, parse_documents

log = logging.getLogger(__name__)
SUFFIXES = (".yaml", ".yml")


def yaml_files(paths: Iterable[Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.suffix in SUFFIXES and f.is_file()))
        elif p.suffix in SUFFIXES and p.is_file():
            out.append(p)
    return out


def read_file(path: Path) -> Replace:
    origin = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Replace(origin, ())
    except (OSError, UnicodeDecodeError) as exc:
        return Replace(origin, None, (ParseError(origin, 0, f"cannot read file: {exc}"),))
    objects, errors = parse_documents(text, origin)
    syntax_broken = any(e.message.startswith("invalid YAML") for e in errors)
    return Replace(origin, None if syntax_broken else tuple(objects), tuple(errors))


class DirectorySource:
    def __init__(self, dirs: list[Path], debounce_ms: int = 50) -> None:
        self.name = "directory"
        self.dirs = dirs
        self.debounce_ms = debounce_ms
        self._known: set[str] = set()  # origins (files) whose objects were delivered
        self._known_dirs: set[str] = set()  # every directory above a known file

    def initial(self) -> list[SourceEvent]:
        return self._track([read_file(f) for f in yaml_files(self.dirs)])

    def _track(self, events: list[Replace]) -> list[SourceEvent]:
        for ev in events:
            if Path(ev.origin).is_file():
                self._known.add(ev.origin)
                self._known_dirs.update(str(p) for p in Path(ev.origin).parents)
            else:
                self._known.discard(ev.origin)
        return list(events)

    def _changed(self, path: Path) -> list[Replace]:
        """Events for one changed path. A directory moved in is read whole; a path that is
        gone drops every file loaded from under it (a directory moved out or deleted)."""
        if path.is_dir():
            return [read_file(f) for f in yaml_files([path])]
        if path.suffix in SUFFIXES:
            return [read_file(path)]
        if path.exists():
            return []
        if str(path) in self._known:
            return [Replace(str(path), ())]
        if str(path) not in self._known_dirs:
            return []  # e.g. an editor's or an atomic writer's temporary file: never loaded
        under = f"{path}{os.sep}"
        return [Replace(o, ()) for o in sorted(self._known) if o.startswith(under)]

    async def run(self, sink: Sink) -> None:
        existing = [d for d in self.dirs if d.exists()]
        await sink([*self.initial(), Synced(self.name)])
        if not existing:
            log.warning("no config directory exists among %s; nothing to watch", self.dirs)
            await asyncio.Event().wait()
        async for changes in watchfiles.awatch(
            *existing, debounce=self.debounce_ms, step=2, recursive=True, rust_timeout=0
        ):
            by_origin: dict[str, Replace] = {}
            for _change, raw_path in sorted(changes, key=lambda c: c[1]):
                for ev in self._changed(Path(raw_path)):
                    by_origin[ev.origin] = ev
            events = self._track([by_origin[o] for o in sorted(by_origin)])
            if events:
                log.info("config files changed: %s", ", ".join(e.origin for e in events if isinstance(e, Replace)))
                await sink(events)
