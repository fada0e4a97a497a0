"""The directory source when inotify cannot tell it what changed (issue 20, h28):

- the kernel's event queue overflowed (a control plane descheduled or busy while a burst of
  changes happens in its tree): the changes past the overflow are not lost, the source looks
  at the whole tree again;
- the watchers report nothing at all (inotify refused, no watches left): the periodic look at
  the whole tree (`rescan_s`) still finds a change;
- the configured directory is itself a link swapped by a rename (git-sync `--link`,
  `ln -sfn`): the new tree applies, and later in-place changes in it too.

Ordering, not speed: each wait has a deadline far above the expected time; a change that
never applies fails at the deadline. Does file I/O (real inotify, a real child process).
"""

from __future__ import annotations

import asyncio
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Any

import pytest
import watchfiles

from controlplane.sources import directory
from controlplane.sources.base import SourceEvent, Synced
from controlplane.sources.directory import DirectorySource
from tests import directoryrun
from tests.directoryrun import Run

DEADLINE = 60.0  # seconds a change may take to apply before a test fails (not the goal)
ROOT = Path(__file__).resolve().parent.parent
running = directoryrun.running  # the shared fixture: `running(src)` runs a source
service, replaced = directoryrun.service, directoryrun.replaced




# --------------------------------------------------------------------------- a queue overflow

CHILD = """\
import asyncio, json, sys
from pathlib import Path
from controlplane.sources.base import Replace, Synced
from controlplane.sources.directory import DirectorySource

async def main() -> None:
    # No periodic look: what finds the lost change must be the overflow itself.
    src = DirectorySource([Path(sys.argv[1])], debounce_ms=100, rescan_s=None)

    async def sink(events):
        for e in events:
            if isinstance(e, Replace):
                names = None if e.objects is None else sorted(o.name for o in e.objects)
                print(json.dumps({"origin": e.origin, "objects": names}), flush=True)
            elif isinstance(e, Synced):
                print(json.dumps({"synced": True}), flush=True)
    await src.run(sink)

asyncio.run(main())
"""


class Child:
    """The source in a process of its own (so that it can be stopped whole, watchfiles'
    thread included), printing one JSON line per Replace or Synced."""

    def __init__(self, conf: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD, str(conf)], stdout=subprocess.PIPE, cwd=ROOT)
        self.lines: list[dict[str, Any]] = []
        self._buf = b""

    def until(self, pred: Callable[[dict[str, Any]], bool], timeout: float = DEADLINE) -> bool:
        """Reads lines until one satisfies `pred` (True) or the deadline passes (False)."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        if any(pred(x) for x in self.lines):
            return True
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            end = time.monotonic() + timeout
            while True:
                while b"\n" in self._buf:
                    line, self._buf = self._buf.split(b"\n", 1)
                    self.lines.append(json.loads(line))
                    if pred(self.lines[-1]):
                        return True
                left = end - time.monotonic()
                if left <= 0 or not sel.select(timeout=left):
                    return False
                chunk = os.read(fd, 65536)
                if not chunk:
                    return False
                self._buf += chunk

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def test_a_change_past_an_inotify_queue_overflow_applies(tmp_path: Path) -> None:
    """The source is stopped while more events than the kernel queues happen in its tree, the
    last of them an in-place rewrite of target.yaml: once it runs again, target.yaml's new
    content applies (before: the events that got through were all at files, so only those
    were looked at, and the rewrite was lost for good)."""
    queued = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if queued > 200_000:
        pytest.skip(f"fs.inotify.max_queued_events is {queued}: too many files to write to overflow it")
    conf = tmp_path / "conf"
    (conf / "noise").mkdir(parents=True)
    target = conf / "target.yaml"
    target.write_text(service("v1"))
    child = Child(conf)
    try:
        assert child.until(lambda x: "synced" in x), child.lines
        assert {"origin": str(target), "objects": ["v1"]} in child.lines
        os.kill(child.proc.pid, signal.SIGSTOP)
        try:
            for i in range(queued // 2 + 1000):  # 3 events each (create, modify, close): the queue overflows
                (conf / "noise" / f"n{i:06d}.txt").write_text("x")
            target.write_text(service("v2"))  # in place, past the overflow
        finally:
            os.kill(child.proc.pid, signal.SIGCONT)
        probe = conf / "probe.yaml"
        probe.write_text(service("probe"))  # a later change: shows the source is alive
        applied = child.until(lambda x: x == {"origin": str(target), "objects": ["v2"]})
        alive = child.until(lambda x: x.get("origin") == str(probe), 0 if applied else 10)
        assert applied, f"target.yaml's rewrite (v2) never applied (probe.yaml applied: {alive}): {child.lines}"
    finally:
        child.close()


def test_the_rename_watch_reports_its_queue_overflow(tmp_path: Path) -> None:
    """More events than the kernel queues, unread: the watch says events were lost (and what
    did get through names files of the tree)."""
    queued = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if queued > 200_000:
        pytest.skip(f"fs.inotify.max_queued_events is {queued}: too many files to write to overflow it")
    watch = directory.RenameWatch()
    if watch.fd < 0:
        pytest.skip("no inotify")
    try:
        watch.follow({str(tmp_path): os.path.realpath(tmp_path)})
        for i in range(queued // 2 + 1000):
            (tmp_path / f"n{i:06d}.txt").write_text("x")
        changed, moved = watch.read()
        assert watch.overflowed
        assert str(tmp_path / "n000000.txt") in changed and not moved
    finally:
        watch.close()


# --------------------------------------------------------------------------- deaf watchers


async def until_applied(queue: asyncio.Queue[list[SourceEvent]], origin: Path, names: list[str]) -> bool:
    """Batches until one replaces `origin` with `names` (True) or the deadline (False)."""
    end = time.monotonic() + DEADLINE
    while (left := end - time.monotonic()) > 0:
        try:
            batch = await asyncio.wait_for(queue.get(), left)
        except TimeoutError:
            return False
        if replaced(batch).get(str(origin)) == names:
            return True
    return False


async def test_with_deaf_watchers_the_periodic_look_still_finds_a_change(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        running: Run) -> None:
    """inotify reports nothing (no watches left, not Linux): a file rewritten in place applies
    all the same, found by the periodic look at the whole tree."""

    async def deaf(*_args: Any, **_kwargs: Any) -> AsyncGenerator[set[tuple[Any, str]], None]:
        await asyncio.Event().wait()
        yield set()

    monkeypatch.setattr(watchfiles, "awatch", deaf)
    monkeypatch.setattr(directory.RenameWatch, "follow", lambda *_args, **_kwargs: None)
    config = tmp_path / "config"
    config.mkdir()
    (config / "a.yaml").write_text(service("a1"))
    src = DirectorySource([config], debounce_ms=20, rescan_s=0.2)
    queue = running(src)
    first = await asyncio.wait_for(queue.get(), DEADLINE)
    assert replaced(first) == {str(config / "a.yaml"): ["a1"]} and isinstance(first[-1], Synced)
    (config / "a.yaml").write_text(service("a2"))
    assert await until_applied(queue, config / "a.yaml", ["a2"]), "the change was never found"


# --------------------------------------------------------------------------- a configured link swapped


async def test_a_config_dir_that_is_a_link_swapped_by_rename_applies_the_new_tree(
        tmp_path: Path, running: Run) -> None:
    """--config-dir /x/current with current -> v1, swapped to v2 by renaming a new link over
    it (git-sync --link, `ln -sfn`): v2's files apply, and a file of v2 rewritten in place
    later applies too (the watches follow the link to the new tree)."""
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    (v1 / "team").mkdir(parents=True)
    (v2 / "team").mkdir(parents=True)
    (v1 / "a.yaml").write_text(service("a-v1"))
    (v2 / "a.yaml").write_text(service("a-v2"))
    (v1 / "team" / "b.yaml").write_text(service("b-v1"))
    (v2 / "team" / "b.yaml").write_text(service("b-v2"))
    current = tmp_path / "current"
    current.symlink_to(v1)
    # No periodic look: what finds the swap must be the watch of the link.
    queue = running(DirectorySource([current], debounce_ms=20, rescan_s=None))
    first = await asyncio.wait_for(queue.get(), DEADLINE)
    assert replaced(first) == {str(current / "a.yaml"): ["a-v1"], str(current / "team" / "b.yaml"): ["b-v1"]}
    new = tmp_path / ".current.tmp"
    new.symlink_to(v2)
    os.replace(new, current)
    assert await until_applied(queue, current / "a.yaml", ["a-v2"]), "the swap of the configured link was not seen"
    (v2 / "team" / "b.yaml").write_text(service("b-v2-edited"))  # in place, in the new tree
    assert await until_applied(queue, current / "team" / "b.yaml", ["b-v2-edited"]), \
        "an in-place change in the new tree was not seen"
