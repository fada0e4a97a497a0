"""The directory source (YAML files watched with watchfiles) feeding the MeshStore.

Covers what a user editing files in a config directory sees: the initial load, edits,
new and removed files delivered within a second, broken files keeping the last good
config serving, and the issues (file, line, field) reported for them. Does file I/O.
"""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from controlplane.model.ir import Issue
from controlplane.model.store import MeshStore
from controlplane.sources.base import Replace, SourceEvent, Synced
from controlplane.sources.directory import DirectorySource

DEADLINE = 1.0  # seconds: a saved file must reach the store within this

REVIEWS = "reviews.default.svc.cluster.local"
RATINGS = "ratings.default.svc.cluster.local"
DETAILS = "details.default.svc.cluster.local"


def service(name: str, port: int = 9080, namespace: str = "default") -> str:
    return textwrap.dedent(f"""\
        apiVersion: v1
        kind: Service
        metadata:
          name: {name}
          namespace: {namespace}
        spec:
          selector:
            app: {name}
          ports:
          - name: http
            port: {port}
        """)


def reviews_vs(regex: str) -> str:
    return textwrap.dedent(f"""\
        apiVersion: networking.meshline.io/v1
        kind: VirtualService
        metadata:
          name: reviews
          namespace: default
        spec:
          hosts:
          - reviews
          http:
          - match:
            - uri:
                regex: "{regex}"
            route:
            - destination:
                host: reviews
        """)


def docs(*parts: str) -> str:
    return "---\n".join(parts)


def line_of(text: str, needle: str) -> int:
    """1-based line of the first line of `text` containing `needle`."""
    for n, line in enumerate(text.splitlines(), start=1):
        if needle in line:
            return n
    raise AssertionError(f"{needle!r} not in text")


def issues_for(store: MeshStore, file: Path) -> list[Issue]:
    return [i for i in store.mesh().issues if i.ref.file == str(file)]


def served_regex(store: MeshStore) -> str | None:
    """The URI regex of the first match of the VirtualService serving reviews, if any."""
    vs = store.mesh().vs_by_host.get(REVIEWS)
    if vs is None:
        return None
    uri = vs.http[0].matches[0].uri
    assert uri is not None and uri.kind == "regex"
    return uri.value


@dataclass
class Watched:
    """A running DirectorySource whose event batches land in `queue` and in `store`."""

    queue: asyncio.Queue[list[SourceEvent]]
    store: MeshStore

    async def next_batch(self, timeout: float = DEADLINE) -> list[SourceEvent]:
        batch = await asyncio.wait_for(self.queue.get(), timeout)
        self.store.apply(batch)
        return batch

    async def until(self, predicate: Callable[[], bool], timeout: float = DEADLINE) -> None:
        """Apply batches until `predicate()` holds; fail if that takes over `timeout`."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while not predicate():
            remaining = end - loop.time()
            if remaining <= 0:
                raise AssertionError("the change was not delivered in time")
            try:
                await self.next_batch(remaining)
            except TimeoutError:
                raise AssertionError(f"the change was not delivered within {timeout}s") from None


Start = Callable[[], Awaitable[Watched]]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    d = tmp_path / "config"
    d.mkdir()
    return d


@pytest.fixture
async def start(config: Path) -> AsyncIterator[Start]:
    """`await start()` runs DirectorySource over `config` (once the test wrote its files)."""
    queue: asyncio.Queue[list[SourceEvent]] = asyncio.Queue()
    tasks: list[asyncio.Task[None]] = []

    async def sink(events: list[SourceEvent]) -> None:
        await queue.put(list(events))

    async def _start() -> Watched:
        tasks.append(asyncio.create_task(DirectorySource([config], debounce_ms=20).run(sink)))
        return Watched(queue, MeshStore())

    yield _start
    for task in tasks:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled()


# --------------------------------------------------------------------------- initial load


async def test_initial_load_yields_all_objects_of_multi_document_files_then_synced(config: Path, start: Start) -> None:
    (config / "services.yaml").write_text(docs(service("reviews"), service("ratings")))
    (config / "nested").mkdir()
    (config / "nested" / "details.yml").write_text(service("details"))

    w = await start()
    batch = await w.next_batch()

    assert isinstance(batch[-1], Synced)
    replaced = {e.origin: e for e in batch if isinstance(e, Replace)}
    assert set(replaced) == {str(config / "services.yaml"), str(config / "nested" / "details.yml")}
    assert sorted(o.name for o in replaced[str(config / "services.yaml")].objects or ()) == ["ratings", "reviews"]
    assert set(w.store.mesh().services) == {REVIEWS, RATINGS, DETAILS}
    assert w.store.mesh().services[REVIEWS].ports[0].port == 9080
    assert not [i for i in w.store.mesh().issues if i.severity == "error"]


async def test_empty_directory_still_reports_synced(start: Start) -> None:
    w = await start()
    batch = await w.next_batch()
    assert batch == [Synced("directory")]
    assert dict(w.store.mesh().services) == {}


# --------------------------------------------------------------------------- live changes


async def test_added_file_is_delivered_within_a_second(config: Path, start: Start) -> None:
    (config / "a.yaml").write_text(service("reviews"))
    w = await start()
    await w.next_batch()

    (config / "b.yaml").write_text(service("ratings"))
    await w.until(lambda: RATINGS in w.store.mesh().services)
    assert set(w.store.mesh().services) == {REVIEWS, RATINGS}


async def test_changed_file_is_delivered_within_a_second(config: Path, start: Start) -> None:
    f = config / "svc.yaml"
    f.write_text(service("reviews", port=9080))
    w = await start()
    await w.next_batch()
    assert w.store.mesh().services[REVIEWS].ports[0].port == 9080

    f.write_text(service("reviews", port=9999))
    await w.until(lambda: w.store.mesh().services[REVIEWS].ports[0].port == 9999)


async def test_object_dropped_from_a_file_is_removed(config: Path, start: Start) -> None:
    f = config / "svc.yaml"
    f.write_text(docs(service("reviews"), service("ratings")))
    w = await start()
    await w.next_batch()

    f.write_text(service("reviews"))
    await w.until(lambda: RATINGS not in w.store.mesh().services)
    assert REVIEWS in w.store.mesh().services


async def test_removed_file_removes_its_objects_within_a_second(config: Path, start: Start) -> None:
    (config / "a.yaml").write_text(service("reviews"))
    (config / "b.yaml").write_text(service("ratings"))
    w = await start()
    await w.next_batch()
    assert RATINGS in w.store.mesh().services

    (config / "b.yaml").unlink()
    await w.until(lambda: RATINGS not in w.store.mesh().services)
    assert REVIEWS in w.store.mesh().services


async def test_non_yaml_files_are_ignored(config: Path, start: Start) -> None:
    (config / "README.md").write_text(service("readme"))
    (config / "svc.yaml.bak").write_text(service("backup"))
    (config / "svc.yaml").write_text(service("reviews"))
    w = await start()
    batch = await w.next_batch()
    assert {e.origin for e in batch if isinstance(e, Replace)} == {str(config / "svc.yaml")}

    # A non-YAML change delivers nothing; the next YAML change is the next batch.
    (config / "notes.txt").write_text(service("notes"))
    (config / "other.json").write_text("{}")
    await asyncio.sleep(0.3)
    (config / "ratings.yaml").write_text(service("ratings"))
    batch = await w.next_batch()
    assert {e.origin for e in batch if isinstance(e, Replace)} == {str(config / "ratings.yaml")}
    assert set(w.store.mesh().services) == {REVIEWS, RATINGS}
    assert not any(i.ref.file and not i.ref.file.endswith(".yaml") for i in w.store.mesh().issues)


# --------------------------------------------------------------------------- broken files


async def test_yaml_syntax_error_keeps_previous_objects_and_reports_file_and_line(config: Path, start: Start) -> None:
    f = config / "svc.yaml"
    f.write_text(docs(service("reviews"), service("ratings")))
    w = await start()
    await w.next_batch()

    broken = service("reviews") + "  bad: value: here\n" + "---\n" + service("ratings")
    f.write_text(broken)
    await w.until(lambda: any("invalid YAML" in i.message for i in issues_for(w.store, f)))

    # The previous objects (both of them) keep serving.
    assert set(w.store.mesh().services) == {REVIEWS, RATINGS}
    [issue] = [i for i in issues_for(w.store, f) if "invalid YAML" in i.message]
    assert issue.severity == "error"
    assert issue.line == line_of(broken, "bad: value: here")
    assert issue.format().startswith(f"{f}:{issue.line}: ")

    # Fixing the file clears the issue and applies the new content.
    f.write_text(service("reviews"))
    await w.until(lambda: RATINGS not in w.store.mesh().services)
    assert not any("invalid YAML" in i.message for i in issues_for(w.store, f))


async def test_syntax_error_line_points_at_the_broken_line(tmp_path: Path) -> None:
    f = tmp_path / "svc.yaml"
    text = service("reviews").replace("  namespace: default\n", "  namespace: default: again\n")
    f.write_text(text)
    store = MeshStore()
    store.apply(DirectorySource([tmp_path]).initial())
    [issue] = store.mesh().issues
    assert issue.ref.file == str(f)
    assert issue.line == line_of(text, "default: again")
    assert dict(store.mesh().services) == {}


async def test_invalid_update_keeps_last_valid_version_serving(config: Path, start: Start) -> None:
    f = config / "reviews.yaml"
    f.write_text(docs(service("reviews"), reviews_vs("^/v1/.*")))
    w = await start()
    await w.next_batch()
    assert served_regex(w.store) == "^/v1/.*"

    bad = docs(service("reviews"), reviews_vs("([a-z"))
    f.write_text(bad)
    await w.until(lambda: any(i.field.endswith("uri.regex") for i in issues_for(w.store, f)))

    assert served_regex(w.store) == "^/v1/.*"
    [issue] = [i for i in issues_for(w.store, f) if i.severity == "error"]
    assert issue.ref.display == "VirtualService/default/reviews"
    assert issue.field == "spec.http[0].match[0].uri.regex"
    assert issue.line == line_of(bad, "regex:")
    assert "([a-z" in issue.message
    assert any("last valid version keeps serving" in i.message for i in issues_for(w.store, f))

    # A valid edit replaces it and clears the error.
    f.write_text(docs(service("reviews"), reviews_vs("^/v2/.*")))
    await w.until(lambda: served_regex(w.store) == "^/v2/.*")
    assert not [i for i in issues_for(w.store, f) if i.severity == "error"]


async def test_invalid_new_object_is_not_served(tmp_path: Path) -> None:
    f = tmp_path / "vs.yaml"
    text = docs(service("reviews"), reviews_vs("([a-z"))
    f.write_text(text)
    store = MeshStore()
    store.apply(DirectorySource([tmp_path]).initial())
    assert REVIEWS not in store.mesh().vs_by_host
    assert REVIEWS in store.mesh().services
    errors = [i for i in store.mesh().issues if i.severity == "error"]
    assert [(i.field, i.line) for i in errors] == [("spec.http[0].match[0].uri.regex", line_of(text, "regex:"))]


# --------------------------------------------------------------------------- duplicates


async def test_same_object_in_two_files_is_reported(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(service("reviews", port=1111))
    (tmp_path / "b.yaml").write_text(service("reviews", port=2222))
    store = MeshStore()
    store.apply(DirectorySource([tmp_path]).initial())

    # One of the definitions serves; the other file is named in an issue.
    dup = [i for i in store.mesh().issues if "also defined in" in i.message]
    assert len(dup) == 1
    issue = dup[0]
    assert issue.ref.display == "Service/default/reviews"
    files = {issue.ref.file, issue.message.split("also defined in ", 1)[1].split(";", 1)[0]}
    assert files == {str(tmp_path / "a.yaml"), str(tmp_path / "b.yaml")}
    served_port = store.mesh().services[REVIEWS].ports[0].port
    assert served_port == (2222 if issue.ref.file == str(tmp_path / "b.yaml") else 1111)


async def test_duplicate_reported_when_second_file_appears_live(config: Path, start: Start) -> None:
    (config / "a.yaml").write_text(service("reviews"))
    w = await start()
    await w.next_batch()
    assert not any("also defined in" in i.message for i in w.store.mesh().issues)

    (config / "b.yaml").write_text(service("reviews"))
    await w.until(lambda: any("also defined in" in i.message for i in w.store.mesh().issues))
    [issue] = [i for i in w.store.mesh().issues if "also defined in" in i.message]
    assert str(config / "a.yaml") in issue.message
    assert issue.ref.file == str(config / "b.yaml")


async def test_removing_the_overriding_duplicate_falls_back_to_the_other_file(config: Path, start: Start) -> None:
    (config / "a.yaml").write_text(service("reviews", port=1111))
    (config / "b.yaml").write_text(service("reviews", port=2222))
    w = await start()
    await w.next_batch()
    assert w.store.mesh().services[REVIEWS].ports[0].port == 2222

    (config / "b.yaml").unlink()
    await w.until(lambda: not any("also defined in" in i.message for i in w.store.mesh().issues))
    assert w.store.mesh().services[REVIEWS].ports[0].port == 1111


# --------------------------------------------------------------------------- whole directories


async def test_directory_moved_in_is_loaded(config: Path, start: Start, tmp_path: Path) -> None:
    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "ratings.yaml").write_text(service("ratings"))
    (staged / "deeper").mkdir()
    (staged / "deeper" / "details.yaml").write_text(service("details"))
    (config / "reviews.yaml").write_text(service("reviews"))
    w = await start()
    await w.next_batch()

    staged.rename(config / "staged")
    await w.until(lambda: {RATINGS, DETAILS} <= set(w.store.mesh().services))
    assert set(w.store.mesh().services) == {REVIEWS, RATINGS, DETAILS}


async def test_directory_moved_out_removes_its_objects(config: Path, start: Start, tmp_path: Path) -> None:
    (config / "team").mkdir()
    (config / "team" / "ratings.yaml").write_text(service("ratings"))
    (config / "reviews.yaml").write_text(service("reviews"))
    w = await start()
    await w.next_batch()
    assert RATINGS in w.store.mesh().services

    (config / "team").rename(tmp_path / "elsewhere")
    await w.until(lambda: RATINGS not in w.store.mesh().services)
    assert set(w.store.mesh().services) == {REVIEWS}
