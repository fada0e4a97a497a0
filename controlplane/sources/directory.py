"""Directory source: YAML files under one or more directories. Does file I/O.

Each file is an origin. A file that fails to parse as YAML keeps its previous objects
(reported as an error); a removed file removes its objects. Changes are watched with
`watchfiles` (inotify), not a polling loop.

Input is bounded (`yamlload.Limits`: size, documents, aliases, depth). A file is read only
when what was opened is a regular file inside a configured directory: a symlink whose
target lies outside every configured directory that holds it is refused (reported as an
error, its previous objects keep serving). Symlinks within the directory, as Kubernetes
mounts a ConfigMap (`key -> ..data/key`, `..data -> ..2026_...`), are followed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path

import watchfiles

from controlplane.sources.base import Replace, Sink, SourceEvent, Synced
from controlplane.sources.yamlload import DEFAULT_LIMITS, Limits, ParseError, parse_documents

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


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _opened_path(fd: int, path: Path) -> str:
    """The real path of what `fd` opened (immune to a symlink swapped after the open)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:  # no /proc: resolve the name instead
        return os.path.realpath(path)


def _refusal(path: Path, opened: str, roots: Sequence[Path]) -> str | None:
    """Why the file `opened` (found as `path`) may not be read, if it may not: it lies
    outside every configured directory that holds `path`. A path under none of `roots`
    was named on its own (a file argument) and is read as named."""
    here = os.path.abspath(path)
    holding = [r for r in roots if _within(here, os.path.abspath(r)) or _within(here, os.path.realpath(r))]
    if not holding or any(_within(opened, os.path.realpath(r)) for r in holding):
        return None
    return (f"refused: symlink to {opened}, outside the config director"
            f"{'y' if len(holding) == 1 else 'ies'} {', '.join(str(r) for r in holding)}")


def read_file(path: Path, roots: Sequence[Path] = (), limits: Limits = DEFAULT_LIMITS) -> Replace:
    """The objects of one YAML file, or why it cannot be read (see the module docstring).
    `roots`: the configured directories the file was found under."""
    origin = str(path)

    def refused(line: int, message: str) -> Replace:
        return Replace(origin, None, (ParseError(origin, line, message, fatal=True),))

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO must not block the reader
    except FileNotFoundError:
        return Replace(origin, ())
    except OSError as exc:
        return refused(0, f"cannot read file: {exc}")
    with os.fdopen(fd, "rb") as f:
        why = _refusal(path, _opened_path(fd, path), roots)
        if why is not None:
            return refused(0, why)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                return refused(0, "refused: not a regular file")
            if info.st_size > limits.max_chars:
                return refused(0, f"refused: file too large: {info.st_size} bytes, the limit is {limits.max_chars}")
            data = f.read(limits.max_chars + 1)
        except OSError as exc:
            return refused(0, f"cannot read file: {exc}")
    if len(data) > limits.max_chars:  # grew after the check
        return refused(0, f"refused: file too large: more than {limits.max_chars} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        return refused(line, f"invalid UTF-8: byte 0x{data[exc.start]:02x} at column {column} ({exc.reason})")
    objects, errors = parse_documents(text, origin, limits)
    broken = any(e.fatal for e in errors)
    return Replace(origin, None if broken else tuple(objects), tuple(errors))


def read_paths(paths: Sequence[Path], limits: Limits = DEFAULT_LIMITS) -> list[Replace]:
    """Every YAML file under `paths` (directories, or files named on their own), read."""
    roots = [p for p in paths if p.is_dir()]
    return [read_file(f, roots, limits) for f in yaml_files(paths)]


class DirectorySource:
    def __init__(self, dirs: list[Path], debounce_ms: int = 50) -> None:
        self.name = "directory"
        self.dirs = dirs
        self.debounce_ms = debounce_ms
        self._known: set[str] = set()  # origins (files) whose objects were delivered
        self._known_dirs: set[str] = set()  # every directory above a known file

    def initial(self) -> list[SourceEvent]:
        return self._track(read_paths(self.dirs))

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
            return [read_file(f, self.dirs) for f in yaml_files([path])]
        if path.suffix in SUFFIXES:
            return [read_file(path, self.dirs)]
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
