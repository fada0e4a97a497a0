"""The directory source's change path (issue 20): a file renamed into place (written to a
temporary name, then renamed: `bench/meshfiles.py`, kubectl-like tools, editors, the
kubelet's ConfigMap swap) applies at once, without the quiet period; a file written in place
still applies only once it has been quiet; and a change to one file of a large tree looks
at that file only (no rescan of the tree) and reads and parses that file only.

Ordering, not speed: the quiet period here is an hour, so a file applied within the test
was applied without it, and one still held is held by it. Does file I/O (real inotify).
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from controlplane.sources import directory
from controlplane.sources.base import Replace, SourceEvent, Synced
from controlplane.sources.directory import DirectorySource
from tests import directoryrun
from tests.directoryrun import Run
from tests.test_directory_source import ConfigMapVolume

HOUR_MS = 3_600_000
DEADLINE = 30.0  # seconds a renamed file may take to arrive before a test fails (not the goal)
running = directoryrun.running  # the shared fixture: `running(src)` runs a source
service, replaced = directoryrun.service, directoryrun.replaced



def rename_in(path: Path, text: str) -> None:
    """What bench/meshfiles.py's `rewrite_atomic` and most tools do: a hidden temporary
    sibling, written whole, renamed over the name."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)



class Counted:
    """Counts the source's file reads (`read_file`) and YAML parses (`parse_documents`)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reads: list[str] = []
        self.parses: list[str] = []
        self._lock = threading.Lock()  # ticks run in a worker thread
        real_read, real_parse = directory.read_file, directory.parse_documents

        def read_file(path: Path, *args: Any, **kwargs: Any) -> Replace:
            with self._lock:
                self.reads.append(str(path))
            return real_read(path, *args, **kwargs)

        def parse_documents(text: str, origin: str, *args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self.parses.append(origin)
            return real_parse(text, origin, *args, **kwargs)

        monkeypatch.setattr(directory, "read_file", read_file)
        monkeypatch.setattr(directory, "parse_documents", parse_documents)

    def reset(self) -> None:
        with self._lock:
            self.reads.clear()
            self.parses.clear()


@pytest.fixture
def config(tmp_path: Path) -> Path:
    d = tmp_path / "config"
    d.mkdir()
    return d


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> Counted:
    return Counted(monkeypatch)


async def next_batch(queue: asyncio.Queue[list[SourceEvent]]) -> list[SourceEvent]:
    return await asyncio.wait_for(queue.get(), DEADLINE)


# --------------------------------------------------------------------------- (a) renamed in: at once


async def test_a_renamed_in_file_applies_while_an_in_place_write_is_still_held(
        config: Path, running: Run) -> None:
    (config / "reviews.yaml").write_text(service("reviews", 1111))
    queue = running(DirectorySource([config], debounce_ms=HOUR_MS))
    [initial, synced] = await next_batch(queue)
    assert isinstance(synced, Synced) and replaced([initial]) == {str(config / "reviews.yaml"): ["reviews"]}

    # A file being written in place (half a document so far, still open) ...
    with open(config / "ratings.yaml", "w") as held:
        held.write("apiVersion: v1\nkind: Service\nmetadata:\n  name: rat")
        held.flush()
        # ... and, meanwhile, a new file and an update of an old one, each renamed into place.
        rename_in(config / "details.yaml", service("details"))
        first = await next_batch(queue)
        rename_in(config / "reviews.yaml", service("reviews", 2222))
        second = await next_batch(queue)
    # The renamed files applied within an hour-long quiet period; the one written in place did not.
    assert replaced(first) == {str(config / "details.yaml"): ["details"]}
    assert replaced(second) == {str(config / "reviews.yaml"): ["reviews"]}
    [reviews] = second
    assert isinstance(reviews, Replace)
    assert [o.body["spec"]["ports"][0]["port"] for o in reviews.objects or ()] == [2222]
    assert all(not e.errors for e in first + second if isinstance(e, Replace))  # the half-written file was not read
    assert queue.empty()


def test_a_rename_applies_in_the_same_tick_an_in_place_write_waits(config: Path, counted: Counted) -> None:
    """`tick` step by step: `moved_in` (what RenameWatch reports) applies that name now; the
    file written in place in the same period applies only after its quiet period."""
    src = DirectorySource([config], debounce_ms=100)
    assert src.initial() == []
    rename_in(config / "a.yaml", service("a"))
    (config / "b.yaml").write_text(service("b"))
    events = src.tick([str(config / "a.yaml"), str(config / "b.yaml"), str(config / ".a.yaml.tmp")], 0.0,
                      moved_in=[str(config / "a.yaml")])
    assert replaced(events) == {str(config / "a.yaml"): ["a"]}
    assert counted.parses == [str(config / "a.yaml")]
    # watchfiles' own report of the rename, after RenameWatch's, is not a second change.
    assert src.tick([str(config / "a.yaml")], 0.01) == []
    assert src.tick([], 0.099, full=False) == []
    assert replaced(src.tick([], 0.1, full=False)) == {str(config / "b.yaml"): ["b"]}
    assert src.next_due() is None
    assert counted.parses == [str(config / "a.yaml"), str(config / "b.yaml")]


def test_a_configmap_swap_applies_its_kept_keys_at_once(config: Path) -> None:
    """The kubelet's one atomic step is renaming `..data_tmp` over `..data`: every key that
    resolves through it arrived whole."""
    vol = ConfigMapVolume(config)
    vol.write({"mesh.yaml": service("reviews", 1111)})
    src = DirectorySource([config], debounce_ms=100)
    assert replaced(src.initial()) == {str(config / "mesh.yaml"): ["reviews"]}
    vol.write({"mesh.yaml": service("reviews", 2222)})
    [ev] = src.tick([str(config / "..data")], 5.0, moved_in=[str(config / "..data")])
    assert isinstance(ev, Replace) and [o.body["spec"]["ports"][0]["port"] for o in ev.objects or ()] == [2222]


def test_a_configmap_swap_removes_a_dropped_key_at_once_with_the_kept_ones(config: Path) -> None:
    """README: a removed ConfigMap key is applied at once. The kubelet renames `..data` over,
    links the new keys, then unlinks the dropped keys' links: once that link is gone, the
    dropped key's objects go in the same change as the kept keys' update (before: only after
    the quiet period, so for that time both the old and the new version of an object moved
    to another key were served, reported as a duplicate)."""
    vol = ConfigMapVolume(config)
    vol.write({"mesh.yaml": service("reviews", 1111), "gone.yaml": service("ratings")})
    src = DirectorySource([config], debounce_ms=HOUR_MS)
    assert replaced(src.initial()) == {str(config / "mesh.yaml"): ["reviews"], str(config / "gone.yaml"): ["ratings"]}
    vol.write({"mesh.yaml": service("reviews", 2222), "new.yaml": service("ratings")})  # ratings moved to a new key
    events = src.tick([str(config / "..data"), str(config / "gone.yaml"), str(config / "new.yaml")], 5.0,
                      moved_in=[str(config / "..data")])
    assert replaced(events) == {str(config / "mesh.yaml"): ["reviews"], str(config / "gone.yaml"): [],
                                str(config / "new.yaml"): ["ratings"]}
    assert src.next_due() is None  # nothing left waiting for the (hour-long) quiet period


def test_a_dropped_key_whose_link_still_dangles_waits_for_its_quiet_period(config: Path) -> None:
    """Seen between the swap and the kubelet's unlinking of the dropped key's link, the new keys
    may not be linked yet either: the dropped key then waits for its quiet period (as a file
    removed by hand does), so an object moving to a new key is never missing meanwhile."""
    vol = ConfigMapVolume(config)
    vol.write({"mesh.yaml": service("reviews"), "gone.yaml": service("ratings")})
    src = DirectorySource([config], debounce_ms=100)
    src.initial()
    stamped = config / "..2099_01_01_00_00_00.1"
    stamped.mkdir()
    (stamped / "mesh.yaml").write_text(service("reviews", 2222))
    (config / "..data_tmp").symlink_to(stamped.name)
    os.rename(config / "..data_tmp", config / "..data")  # swapped; gone.yaml's link still dangles
    events = src.tick([str(config / "..data")], 5.0, moved_in=[str(config / "..data")])
    assert replaced(events) == {str(config / "mesh.yaml"): ["reviews"]}
    (config / "gone.yaml").unlink()
    assert src.tick([str(config / "gone.yaml")], 5.01) == []
    assert replaced(src.tick([], 5.11, full=False)) == {str(config / "gone.yaml"): []}


async def test_through_the_watchers_a_dropped_configmap_key_goes_without_the_quiet_period(
        config: Path, running: Run) -> None:
    vol = ConfigMapVolume(config)
    vol.write({"mesh.yaml": service("reviews", 1111), "gone.yaml": service("ratings")})
    queue = running(DirectorySource([config], debounce_ms=HOUR_MS))
    await next_batch(queue)
    vol.write({"mesh.yaml": service("reviews", 2222)})
    seen: dict[str, list[str]] = {}
    while str(config / "gone.yaml") not in seen:  # (a deadline of DEADLINE per batch, not an hour)
        seen.update(replaced(await next_batch(queue)))
    assert seen == {str(config / "mesh.yaml"): ["reviews"], str(config / "gone.yaml"): []}


def test_a_directory_renamed_in_still_waits_for_its_quiet_period(config: Path, tmp_path: Path) -> None:
    """Files may still be written into a directory after it was moved in: not 'complete'."""
    src = DirectorySource([config], debounce_ms=100)
    assert src.initial() == []
    staged = tmp_path / "team"
    staged.mkdir()
    (staged / "details.yaml").write_text(service("details"))
    os.rename(staged, config / "team")
    assert src.tick([str(config / "team")], 0.0, moved_in=[str(config / "team")]) == []
    assert replaced(src.tick([], 0.1, full=False)) == {str(config / "team" / "details.yaml"): ["details"]}


# --------------------------------------------------------------------------- (b) written in place: quiet first


def test_a_half_written_file_is_not_parsed_before_its_quiet_period(config: Path, counted: Counted) -> None:
    src = DirectorySource([config], debounce_ms=100)
    assert src.initial() == []
    f = config / "mesh.yaml"
    whole = service("reviews") + "---\n" + service("ratings")
    with open(f, "w") as out:
        out.write(whole[: len(whole) // 2])  # cut mid-document: a YAML error if it were read
        out.flush()
        assert src.tick([str(f)], 0.0) == []
        assert src.tick([], 0.05, full=False) == []
        out.write(whole[len(whole) // 2:])  # the rest, 60 ms after the first half
    assert src.tick([str(f)], 0.06) == []
    assert src.tick([], 0.159, full=False) == []
    assert counted.reads == [] and counted.parses == []  # never read while it was being written
    assert replaced(src.tick([], 0.16, full=False)) == {str(f): ["ratings", "reviews"]}
    assert counted.parses == [str(f)]


async def test_a_file_created_in_place_is_not_taken_for_a_rename(
        config: Path, counted: Counted,
        running: Run) -> None:
    """Through the real watchers: `open(O_CREAT)` + writes is reported 'added' by watchfiles
    just like a rename; only the rename applies before the (hour-long) quiet period."""
    queue = running(DirectorySource([config], debounce_ms=HOUR_MS))
    await next_batch(queue)
    with open(config / "half.yaml", "w") as out:
        out.write("apiVersion: v1\nkind: Serv")
        out.flush()
        await asyncio.sleep(0.05)  # (lets the watchers see the creation first; the order is what counts)
        rename_in(config / "marker.yaml", service("marker"))
        batch = await next_batch(queue)
    assert replaced(batch) == {str(config / "marker.yaml"): ["marker"]}
    assert str(config / "half.yaml") not in counted.reads


# --------------------------------------------------------------------------- (c) one file of 1,000


def tree(config: Path, files: int = 1000) -> list[Path]:
    out = []
    for i in range(files):
        sub = config / f"team-{i % 10}"
        sub.mkdir(exist_ok=True)
        out.append(sub / f"svc-{i:04d}.yaml")
        out[-1].write_text(service(f"svc-{i:04d}"))
    return out


def test_one_changed_file_of_1000_is_the_only_one_looked_at_and_read(config: Path, counted: Counted,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    files = tree(config)
    src = DirectorySource([config], debounce_ms=100)
    assert len(src.initial()) == 1000 and len(counted.parses) == 1000 and src.scans == 1
    counted.reset()
    stats: list[str] = []
    real_file = directory._file

    def counting_file(path: str) -> directory.Visible | None:
        stats.append(path)
        return real_file(path)

    monkeypatch.setattr(directory, "_file", counting_file)

    # Written in place: applies after the quiet period; one file stat'ed per look, no scan.
    files[500].write_text(service("svc-0500", 2222))
    assert src.tick([str(files[500])], 0.0) == []
    assert replaced(src.tick([], 0.1, full=False)) == {str(files[500]): ["svc-0500"]}
    # Renamed in: applies at once.
    rename_in(files[7], service("svc-0007", 3333))
    events = src.tick([str(files[7]), str(files[7].with_name(".svc-0007.yaml.tmp"))], 0.2,
                      moved_in=[str(files[7])])
    assert replaced(events) == {str(files[7]): ["svc-0007"]}
    assert src.scans == 1  # no whole-tree look after the initial one
    assert set(stats) == {str(files[500]), str(files[7])}
    assert counted.reads == [str(files[500]), str(files[7])]
    assert counted.parses == [str(files[500]), str(files[7])]

    # A new file, and a removed one, in a directory seen before: still no scan.
    new = config / "team-3" / "extra.yaml"
    new.write_text(service("extra"))
    files[8].unlink()
    assert src.tick([str(new), str(files[8])], 1.0) == []
    assert replaced(src.tick([], 1.1, full=False)) == {str(new): ["extra"], str(files[8]): []}
    assert src.scans == 1

    # A new directory is looked at whole (what else it holds is not known).
    (config / "team-x").mkdir()
    (config / "team-x" / "x.yaml").write_text(service("x"))
    assert src.tick([str(config / "team-x")], 2.0) == []
    assert src.scans == 2
    assert replaced(src.tick([], 2.1, full=False)) == {str(config / "team-x" / "x.yaml"): ["x"]}


async def test_through_the_watchers_a_rename_in_a_1000_file_tree_rescans_nothing(
        config: Path, counted: Counted,
        running: Run) -> None:
    files = tree(config)
    src = DirectorySource([config], debounce_ms=20)
    queue = running(src)
    assert len(await next_batch(queue)) == 1001  # 1,000 files and Synced
    counted.reset()
    rename_in(files[123], service("svc-0123", 2222))
    assert replaced(await next_batch(queue)) == {str(files[123]): ["svc-0123"]}
    # Then one written in place: its batch comes after watchfiles' report of the rename was taken.
    files[321].write_text(service("svc-0321", 3333))
    assert replaced(await next_batch(queue)) == {str(files[321]): ["svc-0321"]}
    assert src.scans == 1
    assert counted.parses == [str(files[123]), str(files[321])]
