"""Directory source: YAML files under one or more directories. Does file I/O.

Each visible YAML file is an origin, named by its path as the directory shows it. A file
that fails to parse as YAML keeps its previous objects (reported as an error); a removed
file removes its objects; an emptied file (no documents left) removes them with a warning
naming the file. Changes are watched with `watchfiles` (inotify), not a polling loop.

What is read (`scan`): the *visible* names under each directory, i.e. never a name starting
with `.`. That leaves out the internals of the atomic writers that publish directories:
a Kubernetes ConfigMap/Secret/projected volume (`key.yaml -> ..data/key.yaml`, `..data ->
..2026_01_02_...`, `..data_tmp`), git-sync's `.worktrees` and `.git`, editors' hidden
swap and lock files. Symlinks are followed (files and directories) when what they resolve
to stays inside a configured directory that holds them; a symlink out is refused (an error
at the link, its previous objects keep serving; a directory link out is not entered).
So each object of a mounted ConfigMap is seen once, through its key.

When a file applies (`Debounce`): once it has been quiet, i.e. nothing touched it (an
inotify event on it, on what it resolves to, or on a directory above either; or a change
of what it resolves to or of its size, times or inode) for `debounce_ms`. A file written
one YAML document at a time, or truncated and then rewritten, applies once, whole; a burst
of writes is one change; a ConfigMap update (`..data` swapped) is picked up by every key
whose target changed, and a removed key removes its objects. Quiet is judged per file: a
file written continuously delays only itself.

The default of 100 ms was measured (2 CPUs, loaded): the longest pause between the writes
of one file was 6 ms for `yaml.safe_dump_all` of 200 documents (90 KB, 60-70 ms in all) and
5 ms for a shell loop appending one document per `cat >>`; a single `write`, `cp`, `cat a b
> f`, `sed -i`, an editor's save and the kubelet's swap are one event. 100 ms leaves a
15-fold margin for a busy machine and adds 0.1 s to a change's way to the proxies. A writer
that pauses longer mid-file (e.g. one network call per object) should write a temporary
file and rename it into place.

Input is bounded (`yamlload.Limits`: size, documents, aliases, depth). A file is read only
when what was opened is a regular file inside a configured directory that holds it
(checked on the opened descriptor, so a symlink swapped meanwhile cannot escape).
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import watchfiles

from controlplane.sources.base import Replace, Sink, SourceEvent, Synced
from controlplane.sources.yamlload import DEFAULT_LIMITS, Limits, ParseError, parse_documents

log = logging.getLogger(__name__)
SUFFIXES = (".yaml", ".yml")
DEFAULT_DEBOUNCE_MS = 100
_EPSILON = 1e-9  # seconds: below any clock's resolution; absorbs float rounding of `t + quiet`


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _holding(path: str, roots: Sequence[Path]) -> list[Path]:
    """The configured directories `path` (as named, not resolved) lies in."""
    here = os.path.abspath(path)
    return [r for r in roots if _within(here, os.path.abspath(r)) or _within(here, os.path.realpath(r))]


def _refusal(path: Path | str, opened: str, roots: Sequence[Path]) -> str | None:
    """Why `opened` (found as `path`) may not be read, if it may not: it lies outside every
    configured directory that holds `path`. A path under none of `roots` was named on its
    own (a file argument) and is read as named."""
    holding = _holding(str(path), roots)
    if not holding or any(_within(opened, os.path.realpath(r)) for r in holding):
        return None
    return (f"refused: symlink to {opened}, outside the config director"
            f"{'y' if len(holding) == 1 else 'ies'} {', '.join(str(r) for r in holding)}")


# --------------------------------------------------------------------------- what is visible


@dataclass(frozen=True, slots=True)
class Visible:
    """A YAML file (or a refused directory link) as a directory shows it. Two observations
    are equal when nothing a reader could notice changed: what the name resolves to and
    that file's inode, size, times and mode."""

    path: str  # the name as found under a configured directory: the origin
    real: str  # what it resolves to
    signature: tuple[int, ...] = ()
    refusal: str | None = None  # a directory symlink out of the config directory


def _file(path: str) -> Visible | None:
    try:
        st = os.stat(path)  # follows symlinks; a dangling one is no file
    except OSError:
        return None
    return Visible(path, os.path.realpath(path),
                   (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode))


def _walk(directory: str, roots: Sequence[Path], inside: frozenset[str], out: dict[str, Visible]) -> None:
    """Visible YAML files under `directory`; `inside`: the real paths of the directories
    entered on the way down (a symlink back to one of them is a loop, not entered)."""
    try:
        with os.scandir(directory) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError:  # gone meanwhile, or not readable
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        path = os.path.join(directory, entry.name)
        try:
            is_dir, is_link = entry.is_dir(), entry.is_symlink()
        except OSError:
            continue
        if is_dir:
            real = os.path.realpath(path)
            if is_link:
                why = _refusal(path, real, roots)
                if why is not None:
                    out[path] = Visible(path, real, refusal=f"{why}: not entered")
                    continue
            if real not in inside:
                _walk(path, roots, inside | {real}, out)
        elif entry.name.endswith(SUFFIXES):
            found = _file(path)
            if found is not None:
                out[path] = found


def scan(paths: Sequence[Path]) -> dict[str, Visible]:
    """Every visible YAML file under `paths` (directories, or files named on their own), by
    name. Reads directories and file metadata only."""
    roots = [p for p in paths if p.is_dir()]
    out: dict[str, Visible] = {}
    for p in paths:
        if p.is_dir():
            _walk(str(p), roots, frozenset({os.path.realpath(p)}), out)
        elif p.suffix in SUFFIXES:
            found = _file(str(p))
            if found is not None:
                out[str(p)] = found
    return dict(sorted(out.items()))


def yaml_files(paths: Iterable[Path]) -> list[Path]:
    """The visible YAML files under `paths` (see `scan`)."""
    return [Path(v.path) for v in scan(list(paths)).values() if v.refusal is None]


# --------------------------------------------------------------------------- reading


def _opened_path(fd: int, path: Path) -> str:
    """The real path of what `fd` opened (immune to a symlink swapped after the open)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:  # no /proc: resolve the name instead
        return os.path.realpath(path)


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


def load(found: Visible, roots: Sequence[Path], limits: Limits = DEFAULT_LIMITS) -> Replace:
    """What `scan` found, read."""
    if found.refusal is not None:
        return Replace(found.path, None, (ParseError(found.path, 0, found.refusal, fatal=True),))
    return read_file(Path(found.path), roots, limits)


def read_paths(paths: Sequence[Path], limits: Limits = DEFAULT_LIMITS) -> list[Replace]:
    """Every visible YAML file under `paths` (directories, or files named on their own), read."""
    roots = [p for p in paths if p.is_dir()]
    return [load(v, roots, limits) for v in scan(paths).values()]


# --------------------------------------------------------------------------- watching


class Debounce:
    """Which names have been quiet for `quiet` seconds since they were last touched. Pure:
    the caller passes the time."""

    def __init__(self, quiet: float) -> None:
        self.quiet = quiet
        self._touched: dict[str, float] = {}

    def touch(self, name: str, now: float) -> None:
        self._touched[name] = now

    def due(self, now: float) -> list[str]:
        """The names quiet since their last touch, sorted; they are forgotten until touched again."""
        ripe = sorted(n for n, t in self._touched.items() if now >= t + self.quiet - _EPSILON)
        for n in ripe:
            del self._touched[n]
        return ripe

    def next_due(self) -> float | None:
        """When the next name becomes due (None: nothing is pending)."""
        return min(self._touched.values()) + self.quiet if self._touched else None


class DirectorySource:
    def __init__(self, dirs: list[Path], debounce_ms: int = DEFAULT_DEBOUNCE_MS,
                 limits: Limits = DEFAULT_LIMITS) -> None:
        """`debounce_ms`: how long a file must be quiet before it applies (module docstring)."""
        self.name = "directory"
        self.dirs = dirs
        self.debounce_ms = debounce_ms
        self.limits = limits
        self._debounce = Debounce(debounce_ms / 1000)
        self._seen: dict[str, Visible] = {}  # the last scan
        self._held: dict[str, int] = {}  # origins delivered -> how many objects they hold
        self._emptied: dict[str, int] = {}  # origins emptied -> how many objects they held

    def initial(self) -> list[SourceEvent]:
        self._seen = scan(self.dirs)
        return self._track([load(v, self.dirs, self.limits) for v in self._seen.values()])

    def _track(self, events: Iterable[Replace]) -> list[SourceEvent]:
        """Remember what each origin holds; an emptied file gets its warning."""
        out: list[SourceEvent] = []
        for ev in events:
            before = self._held.get(ev.origin, 0)
            if ev.objects is None:
                self._held[ev.origin] = before
            elif ev.origin not in self._seen:  # removed
                self._held.pop(ev.origin, None)
                self._emptied.pop(ev.origin, None)
            elif ev.objects or ev.errors:
                self._held[ev.origin] = len(ev.objects)
                self._emptied.pop(ev.origin, None)
            else:
                self._held[ev.origin] = 0
                held = before or self._emptied.get(ev.origin, 0)
                if held:
                    self._emptied[ev.origin] = held
                    log.warning("%s is empty now: its %d object(s) are removed", ev.origin, held)
                    ev = Replace(ev.origin, (), (ParseError(
                        ev.origin, 0, f"the file is empty: the {held} object(s) it held are removed (a file being "
                        "rewritten applies once it is complete)", severity="warning"),))
            out.append(ev)
        return out

    def _targets(self, current: dict[str, Visible]) -> list[tuple[str, str]]:
        """(path, name), sorted: each name under its own path and what it resolves to, now and
        at the last look."""
        out = set()
        for name in current.keys() | self._seen.keys():
            out.add((os.path.abspath(name), name))
            out.update((v.real, name) for v in (current.get(name), self._seen.get(name)) if v is not None)
        return sorted(out)

    @staticmethod
    def _touched_by(changed: str, targets: list[tuple[str, str]]) -> set[str]:
        """The names an inotify event at `changed` may have changed: that name, what it
        resolves to, or anything under either (`targets`, see `_targets`)."""
        here = os.path.abspath(changed)
        out: set[str] = set()
        for mark in {here, os.path.realpath(here)}:
            i = bisect.bisect_left(targets, (mark, ""))
            while i < len(targets) and targets[i][0] == mark:
                out.add(targets[i][1])
                i += 1
            under = mark.rstrip(os.sep) + os.sep
            i = bisect.bisect_left(targets, (under, ""))
            while i < len(targets) and targets[i][0].startswith(under):
                out.add(targets[i][1])
                i += 1
        return out

    def tick(self, changed: Iterable[str], now: float) -> list[SourceEvent]:
        """Take inotify events (paths) seen by `now`, look again, and return the events of the
        names that have been quiet for the debounce since they last changed."""
        current = scan(self.dirs)
        targets = self._targets(current) if changed else []
        for path in changed:
            for name in self._touched_by(path, targets):
                self._debounce.touch(name, now)
        for name in current.keys() | self._seen.keys():
            if current.get(name) != self._seen.get(name):
                self._debounce.touch(name, now)
        self._seen = current
        out: list[Replace] = []
        for name in self._debounce.due(now):
            found = current.get(name)
            if found is not None:
                out.append(load(found, self.dirs, self.limits))
            elif name in self._held:
                out.append(Replace(name, ()))
        return self._track(out)

    def next_due(self) -> float | None:
        """When `tick` has something due even without a new event."""
        return self._debounce.next_due()

    async def run(self, sink: Sink) -> None:
        existing = [d for d in self.dirs if d.exists()]
        if not existing:
            await sink([*self.initial(), Synced(self.name)])
            log.warning("no config directory exists among %s; nothing to watch", self.dirs)
            await asyncio.Event().wait()
        queue: asyncio.Queue[set[str]] = asyncio.Queue()
        step = max(1, min(10, self.debounce_ms // 10))

        async def pump() -> None:
            async for changes in watchfiles.awatch(*existing, debounce=max(step, self.debounce_ms), step=step,
                                                   recursive=True, rust_timeout=0):
                queue.put_nowait({path for _change, path in changes})

        loop = asyncio.get_running_loop()
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(pump())
            await asyncio.sleep(0)  # the watcher is set up: nothing changed from here on is missed
            # Scans and reads run in a thread: a large tree must not stall the event loop.
            await sink([*await asyncio.to_thread(self.initial), Synced(self.name)])
            while True:
                due = self.next_due()
                changed: set[str] = set()
                try:
                    changed = await asyncio.wait_for(queue.get(), None if due is None else max(0.0, due - loop.time()))
                    while not queue.empty():
                        changed |= queue.get_nowait()
                except TimeoutError:
                    pass
                events = await asyncio.to_thread(self.tick, changed, loop.time())
                if events:
                    log.info("config files changed: %s",
                             ", ".join(e.origin for e in events if isinstance(e, Replace)))
                    await sink(events)
