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

A file renamed into place applies at once, without the quiet period: written whole under
another name and then renamed over its name (`os.replace`: `bench/meshfiles.py`, kubectl-like
tools, rsync, most editors' "safe write"), it is complete by construction. So is every name
resolving through a link renamed into place (`ln -sfn`, a ConfigMap's `..data`, git-sync's
link). A name such a rename took away goes at once too: one under a directory link renamed
over, and a ConfigMap key the update dropped once its link is gone (the kubelet unlinks dropped
keys after linking the new ones, so an object moved to a new key is never missing; a dropped
key whose link still dangles waits for its quiet period). The rename is seen by `RenameWatch`
(inotify `IN_MOVED_TO`; watchfiles reports a rename and a fresh `open(O_CREAT)` alike). A directory renamed in is not complete by construction
(files may still be written into it): its files wait for their quiet period. Only the quiet
period protects files written in place (a writer that renames a file in and then goes on
writing into it in place is not protected). Without inotify (not Linux) renamed files wait for
their quiet period too.

What is looked at on a change: the names the events point at (and those still in their
quiet period), one `stat` each, when every event is at a file; the whole tree when an event
is at a directory or a link to one (a directory appeared, went or was swapped). Only the
names that apply are read and parsed.

When events are lost: inotify's queue (`fs.inotify.max_queued_events`) overflows when more
changes happen than the source takes in meanwhile (descheduled, stopped, busy). `RenameWatch`
reports its overflow and the whole tree is looked at again; it watches the same event kinds
as watchfiles in every directory entered, so an event watchfiles dropped there (its overflow is
invisible: it drops notify's path-less rescan event) is either reported by `RenameWatch` or
behind an overflow it reports. A configured path that is itself a link swapped by a rename
(git-sync `--link`, `ln -sfn`) is seen through a watch of its parent, and the whole tree is
looked at again. The backstop for what no watch sees (inotify refused or out of watches, a
change in a hidden directory a name resolves into while watchfiles overflowed) is a look at the
whole tree every `rescan_s` (default 60 s, `meshline serve --rescan-interval`; measured: 44 ms of CPU for the bench's 2,001-file tree, 0.07 % of a core; see
`DirectorySource`); it applies what changed like any event would.

The default of 100 ms was measured (2 CPUs, loaded): the longest pause between the writes
of one file was 6 ms for `yaml.safe_dump_all` of 200 documents (90 KB, 60-70 ms in all) and
5 ms for a shell loop appending one document per `cat >>`; a single `write`, `cp`, `cat a b
> f`, `sed -i`, an editor's save and the kubelet's swap are one event. 100 ms leaves a
15-fold margin for a busy machine and adds 0.1 s to an in-place change's way to the proxies. A writer
that pauses longer mid-file (e.g. one network call per object) should write a temporary
file and rename it into place.

Input is bounded (`yamlload.Limits`: size, documents, aliases, depth). A file is read only
when what was opened is a regular file inside a configured directory that holds it
(checked on the opened descriptor, so a symlink swapped meanwhile cannot escape).
"""

from __future__ import annotations

import asyncio
import bisect
import ctypes
import logging
import os
import stat
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import watchfiles

from controlplane.sources.base import Replace, Sink, SourceEvent, Synced
from controlplane.sources.yamlload import DEFAULT_LIMITS, Limits, ParseError, parse_documents

log = logging.getLogger(__name__)
SUFFIXES = (".yaml", ".yml")
DEFAULT_DEBOUNCE_MS = 100
DEFAULT_RESCAN_S = 60.0
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
    # The name's own link target, absolute but not resolved (`key.yaml -> ..data/key.yaml`:
    # `<dir>/..data/key.yaml`); "" when the name is no link. Kept to tell, once the link is
    # gone, which link renamed into place it resolved through (`DirectorySource._arrived`).
    via: str = field(default="", compare=False)


def _file(path: str) -> Visible | None:
    try:
        st = os.stat(path)  # follows symlinks; a dangling one is no file
    except OSError:
        return None
    real = os.path.realpath(path)
    via = ""
    if real != os.path.abspath(path):  # the name, or a directory above it, is a link
        try:
            via = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), os.readlink(path)))
        except OSError:  # not a link itself (a directory above it is)
            pass
    return Visible(path, real, (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode), via=via)


def _walk(directory: str, roots: Sequence[Path], inside: frozenset[str], out: dict[str, Visible],
          entered: dict[str, str]) -> None:
    """Visible YAML files under `directory`; `inside`: the real paths of the directories
    entered on the way down (a symlink back to one of them is a loop, not entered);
    `entered`: each directory entered (as named) -> what it resolves to."""
    try:
        with os.scandir(directory) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError:  # gone meanwhile, or not readable
        return
    entered[directory] = os.path.realpath(directory)
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
                _walk(path, roots, inside | {real}, out, entered)
        elif entry.name.endswith(SUFFIXES):
            found = _file(path)
            if found is not None:
                out[path] = found


def scan_tree(paths: Sequence[Path]) -> tuple[dict[str, Visible], dict[str, str]]:
    """Every visible YAML file under `paths` (directories, or files named on their own), by
    name, and every directory entered (name -> what it resolves to). Reads directories and
    file metadata only."""
    roots = [p for p in paths if p.is_dir()]
    out: dict[str, Visible] = {}
    entered: dict[str, str] = {}
    for p in paths:
        if p.is_dir():
            _walk(str(p), roots, frozenset({os.path.realpath(p)}), out, entered)
        elif p.suffix in SUFFIXES:
            found = _file(str(p))
            if found is not None:
                out[str(p)] = found
    return dict(sorted(out.items())), entered


def scan(paths: Sequence[Path]) -> dict[str, Visible]:
    """Every visible YAML file under `paths` (see `scan_tree`), by name."""
    return scan_tree(paths)[0]


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

    def forget(self, name: str) -> None:
        """`name` is no longer waiting (it was applied another way)."""
        self._touched.pop(name, None)

    def pending(self) -> set[str]:
        """The names waiting for their quiet period to end."""
        return set(self._touched)

    def due(self, now: float) -> list[str]:
        """The names quiet since their last touch, sorted; they are forgotten until touched again."""
        ripe = sorted(n for n, t in self._touched.items() if now >= t + self.quiet - _EPSILON)
        for n in ripe:
            del self._touched[n]
        return ripe

    def next_due(self) -> float | None:
        """When the next name becomes due (None: nothing is pending)."""
        return min(self._touched.values()) + self.quiet if self._touched else None


class RenameWatch:
    """A second inotify instance over the directories the last scan entered (one watch per
    directory, not recursive), for what watchfiles cannot tell:

    - a name renamed into place (`IN_MOVED_TO`), the signal that a file arrived complete
      (watchfiles reports a rename and a fresh `open(O_CREAT)` alike, "added");
    - a lost event: the kernel's queue overflowed (`IN_Q_OVERFLOW`: `overflowed`), after which
      only a look at the whole tree is sure to find every change. watchfiles drops notify's
      path-less rescan event, so its own overflow is invisible; this watch asks for the same
      event kinds (`EVENTS`) in the directories that matter, so its queue fills at least as fast
      for their events, and it reports every path those events name (`changed`): an event
      watchfiles lost in them is either here or behind an overflow reported here;
    - a configured path that is itself a link (`ln -sfn`, git-sync `--link`): its parent is
      watched for that name only (`links`), since no watch under the link sees it swapped.

    Linux only: elsewhere, or when inotify refuses (no watches left), it reports nothing; a
    renamed file then waits for the quiet period like any other, and the periodic look at the
    whole tree (`DirectorySource(rescan_s=...)`) is the backstop for lost events."""

    _IN_MODIFY = 0x00000002
    _IN_ATTRIB = 0x00000004
    _IN_CLOSE_WRITE = 0x00000008
    _IN_MOVED_FROM = 0x00000040
    _IN_MOVED_TO = 0x00000080
    _IN_CREATE = 0x00000100
    _IN_DELETE = 0x00000200
    _IN_Q_OVERFLOW = 0x00004000
    _IN_IGNORED = 0x00008000
    _IN_ONLYDIR = 0x01000000
    # The kinds notify (watchfiles) asks for on each directory it watches.
    EVENTS = (_IN_CREATE | _IN_MODIFY | _IN_CLOSE_WRITE | _IN_DELETE | _IN_MOVED_FROM | _IN_ATTRIB
              | _IN_MOVED_TO)
    _IN_NONBLOCK = os.O_NONBLOCK
    _IN_CLOEXEC = os.O_CLOEXEC
    _HEADER = struct.Struct("iIII")  # wd, mask, cookie, len; then the name, NUL-padded

    def __init__(self) -> None:
        self._libc: ctypes.CDLL | None = None
        self.fd = -1
        self._wd: dict[tuple[str, str], int] = {}  # (directory as named, what it resolves to) -> watch
        self._dir: dict[int, str] = {}  # watch -> directory as named
        self._only: dict[int, frozenset[str]] = {}  # watch of a link's parent only -> the names reported
        self.overflowed = False  # events were lost since the last `read`
        self._followed: dict[str, str] | None = None  # what `follow` was last given
        self._links: list[str] = []
        self._lost = False  # a watch went away since
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.inotify_init1(self._IN_NONBLOCK | self._IN_CLOEXEC)
        except (OSError, AttributeError):  # not Linux, or no inotify in this libc
            return
        if fd < 0:
            log.info("no inotify for renames (%s): renamed files wait for the quiet period",
                     os.strerror(ctypes.get_errno()))
            return
        libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
        self._libc, self.fd = libc, fd

    def follow(self, directories: dict[str, str], links: Iterable[str] = ()) -> list[str]:
        """Watch exactly `directories` (as named -> what they resolve to): a directory whose
        link now resolves elsewhere is watched again; and the parent of each of `links` (paths
        that are symlinks) for events at that link. Returns the directories newly watched:
        what changed in them before their watch was not reported."""
        if self._libc is None:
            return []
        links = sorted(links)
        if directories is self._followed and links == self._links and not self._lost:
            return []  # (a tick that looked at names only keeps the same directories)
        self._followed, self._links, self._lost = directories, links, False
        added: list[str] = []
        parents: dict[str, set[str]] = {}
        for link in links:
            parent, base = os.path.split(os.path.abspath(link))
            parents.setdefault(parent, set()).add(base)
        wanted = set(directories.items()) | {(p, os.path.realpath(p)) for p in parents}
        for key in self._wd.keys() - wanted:
            wd = self._wd.pop(key)
            if self._dir.get(wd) == key[0] and wd not in self._wd.values():
                del self._dir[wd]
                self._only.pop(wd, None)
                self._libc.inotify_rm_watch(self.fd, wd)  # (fails harmlessly if the directory is gone)
        for key in sorted(wanted - self._wd.keys()):
            wd = self._libc.inotify_add_watch(self.fd, os.fsencode(key[0]), self.EVENTS | self._IN_ONLYDIR)
            if wd < 0:
                log.warning("no inotify watch on %s (%s): its changes are found by the periodic look at "
                            "the whole tree", key[0], os.strerror(ctypes.get_errno()))
                continue
            self._wd[key] = wd  # (the same directory under two names shares one watch: the last name wins)
            self._dir[wd] = key[0]
            added.append(key[0])
        entered = {wd for key, wd in self._wd.items() if key in directories.items()}
        self._only = {wd: frozenset(parents[key[0]]) for key, wd in self._wd.items()
                      if key[0] in parents and wd not in entered}  # (an entered directory: every event counts)
        return added

    def read(self) -> tuple[set[str], set[str]]:
        """(paths changed, paths renamed in) since the last read, as named under the watched
        directories; sets `overflowed` when the kernel dropped events."""
        changed: set[str] = set()
        moved: set[str] = set()
        while self.fd >= 0:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            at = 0
            while at + self._HEADER.size <= len(data):
                wd, mask, _cookie, size = self._HEADER.unpack_from(data, at)
                at += self._HEADER.size
                name = data[at:at + size].split(b"\0", 1)[0]
                at += size
                if mask & self._IN_Q_OVERFLOW:
                    self.overflowed = True
                elif mask & self._IN_IGNORED:  # the directory is gone: one made under its name is watched anew
                    self._dir.pop(wd, None)
                    self._only.pop(wd, None)
                    for key in [k for k, w in self._wd.items() if w == wd]:
                        del self._wd[key]
                        self._lost = True
                elif wd in self._dir and name:
                    base = os.fsdecode(name)
                    only = self._only.get(wd)
                    if only is not None and base not in only:
                        continue
                    path = os.path.join(self._dir[wd], base)
                    (moved if mask & self._IN_MOVED_TO else changed).add(path)
        return changed, moved

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class DirectorySource:
    def __init__(self, dirs: list[Path], debounce_ms: int = DEFAULT_DEBOUNCE_MS,
                 limits: Limits = DEFAULT_LIMITS, rescan_s: float | None = DEFAULT_RESCAN_S) -> None:
        """`debounce_ms`: how long a file must be quiet before it applies (module docstring).
        `rescan_s`: how often `run` looks at the whole tree even without an event, the backstop
        for events inotify lost unseen (None: never)."""
        self.name = "directory"
        self.dirs = dirs
        self.debounce_ms = debounce_ms
        self.rescan_s = rescan_s
        self.limits = limits
        self._debounce = Debounce(debounce_ms / 1000)
        self._seen: dict[str, Visible] = {}  # the last look
        self._entered: dict[str, str] = {}  # the directories the last scan entered (name -> real)
        self._index: list[tuple[str, str]] | None = None  # `_targets` of `_seen`, kept until it changes
        self._held: dict[str, int] = {}  # origins delivered -> how many objects they hold
        self._emptied: dict[str, int] = {}  # origins emptied -> how many objects they held
        self._echo: dict[str, Visible] = {}  # names applied on a rename -> what they were then
        self.scans = 0  # whole-tree looks (`scan_tree`) since the start

    def initial(self) -> list[SourceEvent]:
        self._seen, self._entered = scan_tree(self.dirs)
        self._index = None
        self.scans += 1
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

    @staticmethod
    def _targets(*looks: dict[str, Visible]) -> list[tuple[str, str]]:
        """(path, name), sorted: each name of `looks` under its own path and what it resolves to."""
        out = set()
        for look in looks:
            for name, v in look.items():
                out.add((os.path.abspath(name), name))
                out.add((v.real, name))
        return sorted(out)

    def _seen_targets(self) -> list[tuple[str, str]]:
        if self._index is None:
            self._index = self._targets(self._seen)
        return self._index

    @staticmethod
    def _touched_by(changed: str, targets: list[tuple[str, str]], under: bool = True) -> set[str]:
        """The names an inotify event at `changed` may have changed: that name, what it
        resolves to, or (`under`) anything under either (`targets`, see `_targets`)."""
        here = os.path.abspath(changed)
        out: set[str] = set()
        for mark in {here, os.path.realpath(here)}:
            i = bisect.bisect_left(targets, (mark, ""))
            while i < len(targets) and targets[i][0] == mark:
                out.add(targets[i][1])
                i += 1
            if not under:
                continue
            prefix = mark.rstrip(os.sep) + os.sep
            i = bisect.bisect_left(targets, (prefix, ""))
            while i < len(targets) and targets[i][0].startswith(prefix):
                out.add(targets[i][1])
                i += 1
        return out

    def _names_at(self, changed: set[str]) -> set[str] | None:
        """The names events at `changed` may have changed, when each is a file (not a
        directory, not a link to one, and none before): a look at those names is enough.
        None: some event was at a directory, so the tree must be looked at again whole."""
        entered = {os.path.abspath(d): d for d in self._entered}
        on_their_own = {os.path.abspath(p): str(p) for p in self.dirs}
        targets = self._seen_targets()
        names: set[str] = set()
        for path in changed:
            here = os.path.abspath(path)
            if here in entered or os.path.isdir(here):
                return None  # a directory (or a link to one) appeared, changed or went
            prefix = here.rstrip(os.sep) + os.sep
            i = bisect.bisect_left(targets, (prefix, ""))
            if i < len(targets) and targets[i][0].startswith(prefix):
                return None  # names were found under it: it was a directory
            parent, base = os.path.split(here)
            if here in on_their_own:
                if on_their_own[here].endswith(SUFFIXES):
                    names.add(on_their_own[here])
            elif parent in entered and not base.startswith(".") and base.endswith(SUFFIXES):
                names.add(os.path.join(entered[parent], base))
            names |= self._touched_by(here, targets, under=False)  # links resolving to it
        return names

    def _look(self, names: set[str]) -> tuple[dict[str, Visible], set[str]] | None:
        """The last look with `names` looked at again (and `names`), or None when one of them
        is, or was, a directory (refused or not): that takes a look at the whole tree."""
        current = dict(self._seen)
        for name in names:
            before = self._seen.get(name)
            if before is not None and before.refusal is not None:
                return None
            found = _file(name)
            if found is None:
                current.pop(name, None)
            elif stat.S_ISDIR(found.signature[-1]):
                return None
            else:
                current[name] = found
        return current, names

    def tick(self, changed: Iterable[str], now: float, moved_in: Iterable[str] = (),
             full: bool | None = None) -> list[SourceEvent]:
        """Take inotify events (paths) seen by `now`, look again, and return the events of the
        names that have been quiet for the debounce since they last changed, and of the names
        renamed into place (`moved_in`: `RenameWatch`), which apply at once.

        The look: only the names the events point at and those still waiting, when every
        event is at a file; the whole tree (`scan_tree`) when an event is at a directory or a
        link to one, or with `full`. Without `full`, a tick with no events at all looks at the
        whole tree (the caller cannot say what changed); `run` passes False on a tick that
        only ends a quiet period."""
        changed, moved = set(changed), set(moved_in)
        changed |= moved
        names = None if full or (full is None and not changed) else self._names_at(changed)
        look = None if names is None else self._look(names | self._debounce.pending())
        if names is None or look is None:
            names = None
            current, entered = scan_tree(self.dirs)
            self.scans += 1
            looked: set[str] = current.keys() | self._seen.keys()
            targets = self._targets(current, self._seen) if changed else []
        else:
            current, looked = look
            entered = self._entered
            targets = self._seen_targets()
        pending = self._debounce.pending()
        touched = set(names or ())
        for path in changed:
            touched |= self._touched_by(path, targets)
        for name in touched:
            # The watch's own report of a rename already applied (it comes after RenameWatch's)
            # finds the file as it was applied: not a change.
            echo = self._echo.pop(name, None)
            if echo is None or echo != current.get(name):
                self._debounce.touch(name, now)
        for name in looked:
            if current.get(name) != self._seen.get(name):
                self._debounce.touch(name, now)
        arrived = [n for n in self._arrived(moved, current, looked, self._seen)
                   if n in pending or current.get(n) != self._seen.get(n)]
        if names is None or any((current[n].real if n in current else None)
                                != (self._seen[n].real if n in self._seen else None) for n in looked):
            self._index = None  # names or what they resolve to changed
        self._seen, self._entered = current, entered
        out: list[Replace] = []
        for name in arrived:
            self._debounce.forget(name)
            if name in current:
                self._echo[name] = current[name]
        for name in sorted(set(arrived) | set(self._debounce.due(now))):
            found = current.get(name)
            if found is not None:
                out.append(load(found, self.dirs, self.limits))
            elif name in self._held:
                out.append(Replace(name, ()))
        return self._track(out)

    @staticmethod
    def _arrived(moved: set[str], current: dict[str, Visible], looked: Iterable[str],
                 before: dict[str, Visible]) -> list[str]:
        """The names that `moved` (paths renamed into place) brought: a file renamed to a name,
        or a link renamed over another (`ln -sfn`, a ConfigMap's `..data`, git-sync's link)
        that a name resolves through. A directory renamed in is not among them: files may
        still be written into it; they wait for their quiet period.

        Also the names such a link took away (`before`: the last look): one under a directory
        link renamed over (git-sync), and a ConfigMap's dropped key once its own link (through
        `..data`) is gone: the kubelet unlinks dropped keys only after linking the new ones, so
        an object moved to a new key is there by then. A dropped key whose link still dangles
        waits for its quiet period (the new keys may not be linked yet)."""
        out: list[str] = []
        for path in moved:
            try:
                mode = os.lstat(path).st_mode
            except OSError:
                continue
            if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
                continue
            here = os.path.abspath(path)
            real = os.path.realpath(path)
            below = here.rstrip(os.sep) + os.sep
            for name in looked:
                v = current.get(name)
                if v is None:
                    was = before.get(name)
                    if was is None or was.refusal is not None:
                        continue
                    at = os.path.abspath(name)
                    if at == here or at.startswith(below) or (
                            was.via.startswith(below) and not os.path.lexists(name)):
                        out.append(name)
                    continue
                if os.path.abspath(name) == here or v.real == real or v.real.startswith(real.rstrip(os.sep) + os.sep):
                    out.append(name)
        return out

    def next_due(self) -> float | None:
        """When `tick` has something due even without a new event."""
        return self._debounce.next_due()

    def links(self) -> list[str]:
        """The configured paths that are symlinks: swapped by a rename in their parent
        (`ln -sfn`, git-sync `--link`), which no watch under them sees."""
        return [str(p) for p in self.dirs if os.path.islink(p)]

    async def run(self, sink: Sink) -> None:
        existing = [d for d in self.dirs if d.exists()]
        if not existing:
            await sink([*self.initial(), Synced(self.name)])
            log.warning("no config directory exists among %s; nothing to watch", self.dirs)
            await asyncio.Event().wait()
        # (paths changed, paths renamed into place, events were lost: look at the whole tree)
        queue: asyncio.Queue[tuple[set[str], set[str], bool]] = asyncio.Queue()
        step = max(1, min(10, self.debounce_ms // 10))

        async def pump() -> None:
            async for changes in watchfiles.awatch(*existing, debounce=max(step, self.debounce_ms), step=step,
                                                   recursive=True, rust_timeout=0):
                queue.put_nowait(({path for _change, path in changes}, set(), False))

        renames = RenameWatch()

        def renamed() -> None:
            changed, moved = renames.read()
            lost, renames.overflowed = renames.overflowed, False
            if lost:
                log.warning("inotify dropped events (its queue overflowed): looking at the whole tree")
            if changed or moved or lost:
                queue.put_nowait((changed, moved, lost))

        loop = asyncio.get_running_loop()
        try:
            if renames.fd >= 0:
                loop.add_reader(renames.fd, renamed)
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(pump())
                await asyncio.sleep(0)  # the watcher is set up: nothing changed from here on is missed
                # Scans and reads run in a thread: a large tree must not stall the event loop.
                initial = await asyncio.to_thread(self.initial)
                renames.follow(self._entered, self.links())
                await sink([*initial, Synced(self.name)])
                every = self.rescan_s or None
                rescan_at = None if every is None else loop.time() + every
                while True:
                    due = self.next_due()
                    wake = min((t for t in (due, rescan_at) if t is not None), default=None)
                    changed: set[str] = set()
                    moved: set[str] = set()
                    lost = False
                    try:
                        # (not `wait_for`: on 3.11 it swallows a cancellation that meets a new item)
                        async with asyncio.timeout(None if wake is None else max(0.0, wake - loop.time())):
                            changed, moved, lost = await queue.get()
                        while not queue.empty():
                            more, more_moved, more_lost = queue.get_nowait()
                            changed |= more
                            moved |= more_moved
                            lost |= more_lost
                    except TimeoutError:
                        pass
                    now = loop.time()
                    if rescan_at is not None and now >= rescan_at:
                        lost = True  # the periodic look: for what inotify lost without a word
                    if lost and every is not None:
                        rescan_at = now + every
                    events = await asyncio.to_thread(self.tick, changed, now, moved,
                                                     True if lost else None if changed or moved else False)
                    fresh = renames.follow(self._entered, self.links())
                    if fresh:  # a directory appeared or was swapped since the look: look again, watched now
                        queue.put_nowait((set(), set(), True))
                    if events:
                        log.info("config files changed: %s",
                                 ", ".join(e.origin for e in events if isinstance(e, Replace)))
                        await sink(events)
        finally:
            if renames.fd >= 0:
                loop.remove_reader(renames.fd)
            renames.close()
