"""The directory source (YAML files watched with watchfiles) feeding the MeshStore.

Covers what a user editing files in a config directory sees: the initial load, edits,
new and removed files delivered (in well under a second: bench/timing.py), broken files keeping the last good
config serving, and the issues (file, line, field) reported for them; a directory kept as
the kubelet keeps a mounted ConfigMap (`..data` swapped atomically) seen once per key and
followed through its updates; files applied only whole (written a document at a time,
truncated then rewritten). Does file I/O.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest

from controlplane.localrun import free_port, stop, wait_http
from controlplane.model.ir import Issue
from controlplane.model.store import MeshStore
from controlplane.sources.base import Replace, SourceEvent, Synced
from controlplane.sources.directory import Debounce, DirectorySource, read_file, read_paths
from controlplane.sources.yamlload import Limits

# Seconds a saved file may take to reach the store before a test fails: a generous deadline,
# not the goal (delivered in well under a second; measured by bench/timing.py). See docs/testing.md.
DEADLINE = 30.0

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
    """A running DirectorySource whose event batches land in `queue` and in `store`;
    `batches` and `services` record every batch applied and the services served after it."""

    queue: asyncio.Queue[list[SourceEvent]]
    store: MeshStore
    batches: list[list[SourceEvent]] = field(default_factory=list)
    services: list[set[str]] = field(default_factory=list)

    async def next_batch(self, timeout: float = DEADLINE) -> list[SourceEvent]:
        batch = await asyncio.wait_for(self.queue.get(), timeout)
        self.store.apply(batch)
        self.batches.append(batch)
        self.services.append(set(self.store.mesh().services))
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


Start = Callable[..., Awaitable[Watched]]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    d = tmp_path / "config"
    d.mkdir()
    return d


@pytest.fixture
async def start(config: Path) -> AsyncIterator[Start]:
    """`await start()` runs DirectorySource over `config` (once the test wrote its files);
    `await start(debounce_ms)` with another quiet period than the fast 20 ms."""
    queue: asyncio.Queue[list[SourceEvent]] = asyncio.Queue()
    tasks: list[asyncio.Task[None]] = []

    async def sink(events: list[SourceEvent]) -> None:
        await queue.put(list(events))

    async def _start(debounce_ms: int = 20) -> Watched:
        tasks.append(asyncio.create_task(DirectorySource([config], debounce_ms=debounce_ms).run(sink)))
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


async def test_added_file_is_delivered(config: Path, start: Start) -> None:
    (config / "a.yaml").write_text(service("reviews"))
    w = await start()
    await w.next_batch()

    (config / "b.yaml").write_text(service("ratings"))
    await w.until(lambda: RATINGS in w.store.mesh().services)
    assert set(w.store.mesh().services) == {REVIEWS, RATINGS}


async def test_changed_file_is_delivered(config: Path, start: Start) -> None:
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


async def test_removed_file_removes_its_objects(config: Path, start: Start) -> None:
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


# --------------------------------------------------------------------------- hostile input (issue 14)


def alias_bomb() -> str:
    """The classic "billion laughs": nine levels of nine aliases each, about 500 bytes that
    expand to 9**9 strings."""
    rows = ['  a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    rows += [f"  {c}: &{c} [{', '.join([f'*{p}'] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi", strict=True)]
    return "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: lol\n  namespace: default\ndata:\n" + "\n".join(rows) + "\n"


def refusals(store: MeshStore, file: Path) -> list[Issue]:
    return [i for i in issues_for(store, file) if i.severity == "error"]


async def test_alias_bomb_is_refused_at_its_line(config: Path, start: Start) -> None:
    (config / "reviews.yaml").write_text(service("reviews"))
    w = await start()
    await w.next_batch()

    bomb = config / "lol.yaml"
    text = alias_bomb()
    assert len(text.encode()) < 600
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    bomb.write_text(text)
    await w.until(lambda: bool(refusals(w.store, bomb)))
    assert loop.time() - t0 < DEADLINE  # expanding its 9**9 strings would take minutes and gigabytes

    [issue] = refusals(w.store, bomb)
    assert issue.ref.file == str(bomb)
    assert "alias bomb" in issue.message
    assert issue.line is not None and "*" in text.splitlines()[issue.line - 1]  # the line of an alias
    assert issue.format().startswith(f"{bomb}:{issue.line}: ")
    # The rest of the mesh keeps serving, and keeps following edits.
    assert REVIEWS in w.store.mesh().services
    (config / "ratings.yaml").write_text(service("ratings"))
    await w.until(lambda: RATINGS in w.store.mesh().services)


MERGE_BOMB = ("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: merge\ndata:\n  a: &a {x: 1, y: 2}\n"
              + "".join(f"  {c}: &{c} {{<<: [{', '.join([f'*{p}'] * 9)}]}}\n"
                        for p, c in zip("abcdefgh", "bcdefghi", strict=True)))


@pytest.mark.parametrize(("text", "needle"), [
    pytest.param("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: loop\ndata:\n  a: &a [*a]\n",
                 "recursive alias", id="recursive-alias"),
    pytest.param(MERGE_BOMB, "alias bomb", id="merge-key-bomb"),
    pytest.param("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: deep\ndata:\n  a: "
                 + "[" * 900 + "]" * 900 + "\n", "nested deeper", id="deep-nesting"),
])
async def test_other_expansions_are_refused_with_file_and_line(tmp_path: Path, text: str, needle: str) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    (tmp_path / "reviews.yaml").write_text(service("reviews"))
    store = MeshStore()
    t0 = asyncio.get_running_loop().time()
    store.apply(DirectorySource([tmp_path]).initial())
    assert asyncio.get_running_loop().time() - t0 < DEADLINE
    [issue] = refusals(store, f)
    assert needle in issue.message
    assert issue.line is not None and issue.line >= 6  # in `data`, not the document's start
    assert REVIEWS in store.mesh().services


async def test_anchors_and_aliases_in_ordinary_use_are_accepted(tmp_path: Path) -> None:
    text = textwrap.dedent("""\
        apiVersion: v1
        kind: Service
        metadata:
          name: reviews
          namespace: default
          labels: &labels {app: reviews, team: books}
        spec:
          selector: *labels
          ports:
          - &http {name: http, port: 9080}
        ---
        apiVersion: v1
        kind: Service
        metadata:
          name: ratings
          namespace: default
          annotations: &common {team: books, tier: backend}
          labels: {<<: *common, app: ratings}
        spec:
          selector: {app: ratings}
          ports:
          - &http {name: http, port: 9080}
        """)
    (tmp_path / "svc.yaml").write_text(text)
    store = MeshStore()
    store.apply(DirectorySource([tmp_path]).initial())
    assert not [i for i in store.mesh().issues if i.severity == "error"]
    assert store.mesh().services[REVIEWS].ports[0].port == 9080
    assert store.mesh().services[RATINGS].ports[0].port == 9080
    assert dict(store.mesh().services[REVIEWS].selector) == {"app": "reviews", "team": "books"}


def test_file_size_and_document_count_are_bounded(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text(service("reviews") + "# " + "x" * 5000 + "\n")
    r = read_file(big, [tmp_path], Limits(max_chars=4096))
    assert r.objects is None  # refused whole: previous objects keep serving
    [err] = r.errors
    assert "too large" in err.message and "4096" in err.message

    many = tmp_path / "many.yaml"
    text = docs(*(service(f"svc{i}") for i in range(5)))
    many.write_text(text)
    r = read_file(many, [tmp_path], Limits(max_documents=3))
    assert r.objects is None
    [err] = r.errors
    assert "more than 3 YAML documents" in err.message
    assert err.line == line_of(text, "name: svc3") - 3  # the 4th document's first line


async def test_invalid_utf8_is_reported_with_its_line(config: Path, start: Start) -> None:
    f = config / "svc.yaml"
    f.write_text(service("reviews"))
    w = await start()
    await w.next_batch()

    data = service("reviews").replace("app: reviews", "app: caf\udce9", 1).encode("utf-8", "surrogateescape")
    f.write_bytes(data)
    await w.until(lambda: any("UTF-8" in i.message for i in issues_for(w.store, f)))
    [issue] = [i for i in issues_for(w.store, f) if "UTF-8" in i.message]
    assert issue.line == line_of(service("reviews"), "app: reviews")
    assert "0xe9" in issue.message
    assert REVIEWS in w.store.mesh().services  # the last good version keeps serving


# --------------------------------------------------------------------------- symlinks


async def test_symlink_to_a_file_outside_the_config_directory_is_refused(config: Path, tmp_path: Path,
                                                                         start: Start) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "secret.yaml").write_text(service("ratings"))
    (config / "reviews.yaml").write_text(service("reviews"))
    (config / "ratings.yaml").symlink_to(outside / "secret.yaml")
    w = await start()
    await w.next_batch()

    link = config / "ratings.yaml"
    assert RATINGS not in w.store.mesh().services
    assert REVIEWS in w.store.mesh().services
    [issue] = refusals(w.store, link)
    assert "outside the config directory" in issue.message and str(outside / "secret.yaml") in issue.message

    # A directory symlinked in live from outside: refused at the link, never entered.
    (outside / "team").mkdir()
    (outside / "team" / "details.yaml").write_text(service("details"))
    (config / "team").symlink_to(outside / "team", target_is_directory=True)
    await w.until(lambda: bool(refusals(w.store, config / "team")))
    [issue] = refusals(w.store, config / "team")
    assert "outside the config directory" in issue.message and str(outside / "team") in issue.message
    assert DETAILS not in w.store.mesh().services
    assert not issues_for(w.store, config / "team" / "details.yaml")

    # Removing the link clears its refusal.
    (config / "team").unlink()
    await w.until(lambda: not refusals(w.store, config / "team"))


async def test_fifo_named_like_yaml_does_not_block_the_source(config: Path, start: Start) -> None:
    w = await start()
    await w.next_batch()

    fifo = config / "pipe.yaml"
    os.mkfifo(fifo)
    await asyncio.sleep(0.2)
    (config / "reviews.yaml").write_text(service("reviews"))
    await w.until(lambda: REVIEWS in w.store.mesh().services)


def test_serve_reports_an_alias_bomb_and_keeps_serving(tmp_path: Path) -> None:
    """`meshline serve` itself (a subprocess): a bomb saved into its config directory is an
    error in /v1/config/errors; health, memory and the rest of the mesh are unaffected."""
    config = tmp_path / "config"
    config.mkdir()
    (config / "reviews.yaml").write_text(service("reviews"))
    status = f"http://127.0.0.1:{free_port()}"
    log = tmp_path / "serve.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "controlplane.cli", "serve", "--config-dir", str(config), "--no-ca",
         "--ca-address", "off", "--xds-address", f"127.0.0.1:{free_port()}",
         "--status-address", status.removeprefix("http://"), "--debounce-ms", "20"],
        cwd=Path(__file__).resolve().parent.parent, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        wait_http(f"{status}/readyz", timeout=60, proc=proc)
        bomb = config / "lol.yaml"
        t0 = time.monotonic()
        bomb.write_text(alias_bomb())
        found: list[dict[str, object]] = []
        while not found:  # (expanding the bomb would take minutes and gigabytes)
            assert time.monotonic() - t0 < DEADLINE, log.read_text()[-3000:]
            # Healthy meanwhile (how fast /healthz answers is measured by bench/timing.py).
            assert httpx.get(f"{status}/healthz", timeout=DEADLINE).status_code == 200
            found = [e for e in httpx.get(f"{status}/v1/config/errors", timeout=DEADLINE).json()
                     if e["file"] == str(bomb)]
            time.sleep(0.05)
        [error] = found
        assert "alias bomb" in str(error["message"]) and int(str(error["line"])) > 1
        assert psutil.Process(proc.pid).memory_info().rss < 400 * 1024 * 1024
        names = {s["name"] for s in httpx.get(f"{status}/v1/services", timeout=2).json()}
        assert names == {"reviews"}

        (config / "ratings.yaml").write_text(service("ratings"))
        deadline = time.monotonic() + DEADLINE
        while "ratings" not in {s["name"] for s in httpx.get(f"{status}/v1/services", timeout=2).json()}:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
    finally:
        stop(proc)


@pytest.mark.parametrize("value", [pytest.param("1" * 5000, id="5000-digit-int"),
                                   pytest.param("2026-13-45", id="impossible-date")])
def test_scalar_python_cannot_build_is_an_error_not_a_crash(tmp_path: Path, value: str) -> None:
    text = service("reviews").replace("port: 9080", f"port: {value}")
    f = tmp_path / "svc.yaml"
    f.write_text(docs(service("ratings"), text))
    r = read_file(f, [tmp_path])
    assert r.objects is None
    [err] = r.errors
    assert err.message.startswith("invalid YAML") and err.line > 1


# --------------------------------------------------------------------------- a mounted ConfigMap (issue 14)


class ConfigMapVolume:
    """A directory kept exactly as the kubelet's AtomicWriter keeps a ConfigMap volume: the
    payload in a timestamped directory `..<UTC time>.<random>`, `..data` pointing at it and
    each key a symlink through `..data`. An update writes the new timestamped directory,
    points `..data_tmp` at it and renames that over `..data` (the one atomic step), then
    adds the new keys' symlinks, removes the dropped keys' and deletes the old directory."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def write(self, payload: dict[str, str]) -> None:
        data = self.root / "..data"
        old = os.readlink(data) if data.is_symlink() else None
        stamped = self.root / (time.strftime("..%Y_%m_%d_%H_%M_%S.", time.gmtime()) + str(secrets.randbelow(10**9)))
        stamped.mkdir()
        for key, text in payload.items():
            (stamped / key).write_text(text)
        (self.root / "..data_tmp").symlink_to(stamped.name)
        os.rename(self.root / "..data_tmp", data)
        for key in payload:
            if not (self.root / key).is_symlink():
                (self.root / key).symlink_to(Path("..data") / key)
        for entry in self.root.iterdir():
            if not entry.name.startswith("..") and entry.is_symlink() and entry.name not in payload:
                entry.unlink()
        if old is not None:
            shutil.rmtree(self.root / old)


def origins(batches: list[list[SourceEvent]]) -> set[str]:
    return {e.origin for batch in batches for e in batch if isinstance(e, Replace)}


def duplicates(store: MeshStore) -> list[Issue]:
    return [i for i in store.mesh().issues if "also defined in" in i.message]


async def test_configmap_objects_are_seen_once_through_their_keys(config: Path, start: Start) -> None:
    vol = ConfigMapVolume(config)
    vol.write({"mesh.yaml": docs(service("reviews"), service("ratings")), "details.yaml": service("details")})
    w = await start()
    await w.next_batch()

    assert origins(w.batches) == {str(config / "mesh.yaml"), str(config / "details.yaml")}
    assert set(w.store.mesh().services) == {REVIEWS, RATINGS, DETAILS}
    assert not duplicates(w.store)
    assert not [i for i in w.store.mesh().issues if i.severity == "error"]
    # `meshline analyze` reads the same names.
    assert [r.origin for r in read_paths([config])] == [str(config / "details.yaml"), str(config / "mesh.yaml")]


async def test_configmap_key_removed_removes_its_objects(config: Path, start: Start) -> None:
    vol = ConfigMapVolume(config)
    vol.write({"reviews.yaml": service("reviews"), "ratings.yaml": service("ratings")})
    w = await start()
    await w.next_batch()
    assert {REVIEWS, RATINGS} <= set(w.store.mesh().services)

    vol.write({"reviews.yaml": service("reviews")})
    await w.until(lambda: RATINGS not in w.store.mesh().services)
    assert set(w.store.mesh().services) == {REVIEWS}
    assert all(REVIEWS in served for served in w.services)  # the kept key never blinked
    assert origins(w.batches) <= {str(config / "reviews.yaml"), str(config / "ratings.yaml")}
    assert not duplicates(w.store)


async def test_configmap_update_of_a_key_is_picked_up(config: Path, start: Start) -> None:
    vol = ConfigMapVolume(config)
    vol.write({"mesh.yaml": docs(service("reviews"), reviews_vs("^/v1/.*"))})
    w = await start()
    await w.next_batch()
    assert served_regex(w.store) == "^/v1/.*"

    # Only `..data` moves: the key's own symlink is untouched.
    vol.write({"mesh.yaml": docs(service("reviews"), reviews_vs("^/v2/.*")), "ratings.yaml": service("ratings")})
    await w.until(lambda: served_regex(w.store) == "^/v2/.*" and RATINGS in w.store.mesh().services)
    assert w.store.mesh().vs_by_host[REVIEWS].ref.file == str(config / "mesh.yaml")
    assert origins(w.batches) == {str(config / "mesh.yaml"), str(config / "ratings.yaml")}
    assert not duplicates(w.store)

    vol.write({"mesh.yaml": docs(service("reviews"), reviews_vs("^/v3/.*")), "ratings.yaml": service("ratings")})
    await w.until(lambda: served_regex(w.store) == "^/v3/.*")
    assert not duplicates(w.store)


async def test_edited_symlink_target_is_picked_up(config: Path, start: Start) -> None:
    versions = config / ".versions"  # hidden: read only through the link
    versions.mkdir()
    (versions / "v1.yaml").write_text(docs(service("reviews"), reviews_vs("^/v1/.*")))
    (versions / "v2.yaml").write_text(docs(service("reviews"), reviews_vs("^/v2/.*")))
    link = config / "mesh.yaml"
    link.symlink_to(Path(".versions") / "v1.yaml")
    w = await start()
    await w.next_batch()
    assert served_regex(w.store) == "^/v1/.*"

    # Retargeted atomically (`ln -sfn`: a new link renamed over the old one).
    (config / "mesh.yaml.tmp").symlink_to(Path(".versions") / "v2.yaml")
    os.rename(config / "mesh.yaml.tmp", link)
    await w.until(lambda: served_regex(w.store) == "^/v2/.*")

    # The target edited in place.
    (versions / "v2.yaml").write_text(docs(service("reviews"), reviews_vs("^/v2b/.*")))
    await w.until(lambda: served_regex(w.store) == "^/v2b/.*")
    assert origins(w.batches) == {str(link)}
    assert not duplicates(w.store)


async def test_directory_symlink_swapped_like_git_sync_is_followed(config: Path, start: Start) -> None:
    """git-sync publishes a checkout as `current -> .worktrees/<hash>` and swaps the link."""
    for rev, regex in (("aaa", "^/v1/.*"), ("bbb", "^/v2/.*")):
        (config / ".worktrees" / rev).mkdir(parents=True)
        (config / ".worktrees" / rev / "mesh.yaml").write_text(docs(service("reviews"), reviews_vs(regex)))
    (config / "current").symlink_to(Path(".worktrees") / "aaa", target_is_directory=True)
    w = await start()
    await w.next_batch()
    assert served_regex(w.store) == "^/v1/.*"

    (config / "current.tmp").symlink_to(Path(".worktrees") / "bbb", target_is_directory=True)
    os.rename(config / "current.tmp", config / "current")
    await w.until(lambda: served_regex(w.store) == "^/v2/.*")
    assert origins(w.batches) == {str(config / "current" / "mesh.yaml")}
    assert not duplicates(w.store)


# --------------------------------------------------------------------------- whole files only (issue 14)

# The debounce in the tests below. Each pause of their writers (20 ms) must stay well inside it
# on a busy machine too (a 10x slower writer pauses ~200 ms), hence 3 s.
QUIET_MS = 3000
PAUSE = 0.02


async def test_a_file_written_one_document_at_a_time_applies_once_whole(config: Path, start: Start) -> None:
    (config / "reviews.yaml").write_text(service("reviews"))
    w = await start(QUIET_MS)
    await w.next_batch()
    names = ["ratings", "details", "productpage", "mongodb", "mysql"]

    with open(config / "bookinfo.yaml", "w") as f:
        for n, name in enumerate(names):
            f.write(("---\n" if n else "") + service(name))
            f.flush()
            await asyncio.sleep(PAUSE)
    full = {REVIEWS, *(f"{n}.default.svc.cluster.local" for n in names)}
    await w.until(lambda: set(w.store.mesh().services) == full, timeout=DEADLINE + QUIET_MS / 1000)

    # Never a partial mesh, and the burst was one change.
    assert all(served in ({REVIEWS}, full) for served in w.services)
    assert [e.origin for b in w.batches[1:] for e in b if isinstance(e, Replace)] == [str(config / "bookinfo.yaml")]


async def test_a_file_truncated_then_rewritten_never_applies_empty(config: Path, start: Start) -> None:
    f = config / "mesh.yaml"
    f.write_text(docs(service("reviews"), service("ratings")))
    w = await start(QUIET_MS)
    await w.next_batch()

    with open(f, "w") as out:  # truncated ...
        out.flush()
        await asyncio.sleep(PAUSE)
        out.write(docs(service("reviews"), service("ratings"), service("details")))  # ... and rewritten
    await w.until(lambda: DETAILS in w.store.mesh().services, timeout=DEADLINE + QUIET_MS / 1000)
    assert all({REVIEWS, RATINGS} <= served for served in w.services)
    assert not issues_for(w.store, f)


async def test_an_emptied_file_removes_its_objects_with_a_warning(config: Path, start: Start) -> None:
    f = config / "mesh.yaml"
    f.write_text(docs(service("reviews"), service("ratings")))
    (config / "empty.yaml").write_text("# nothing yet\n")
    w = await start()
    await w.next_batch()
    assert not issues_for(w.store, config / "empty.yaml")  # empty from the start: nothing to say

    f.write_text("")
    await w.until(lambda: not w.store.mesh().services)
    [issue] = issues_for(w.store, f)
    assert issue.ref.file == str(f) and issue.format().startswith(f"{f}:")
    assert "empty" in issue.message and "2 object(s)" in issue.message
    [replace] = [e for e in w.batches[-1] if isinstance(e, Replace)]
    assert replace.objects == () and [e.severity for e in replace.errors] == ["warning"]

    # Still empty after another save: still said; content again: the warning is gone.
    f.write_text("\n")
    await w.until(lambda: len(w.batches) >= 3)
    assert [i.message for i in issues_for(w.store, f)] == [issue.message]
    f.write_text(service("reviews"))
    await w.until(lambda: REVIEWS in w.store.mesh().services)
    assert not issues_for(w.store, f)


# --------------------------------------------------------------------------- the debounce, step by step


def test_debounce_releases_a_name_once_it_has_been_quiet() -> None:
    d = Debounce(0.1)
    d.touch("a", 0.0)
    d.touch("a", 0.05)  # a burst: the quiet period starts again
    d.touch("b", 0.06)
    assert d.due(0.12) == []
    assert d.next_due() == pytest.approx(0.15)
    assert d.due(0.15) == ["a"]
    assert d.due(0.16) == ["b"]
    assert d.due(9.0) == [] and d.next_due() is None


def test_a_growing_file_applies_only_after_the_debounce(config: Path) -> None:
    """`tick` with explicit times (no watcher): every look that finds the file changed
    restarts its quiet period; only then is it read, whole."""
    f = config / "mesh.yaml"
    src = DirectorySource([config], debounce_ms=100)
    assert src.initial() == []

    f.write_text(service("reviews"))
    assert src.tick([str(f)], 0.0) == []
    f.write_text(docs(service("reviews"), service("ratings")))
    assert src.tick([str(f)], 0.05) == []
    assert src.tick([], 0.149) == []  # quiet for 99 ms only
    [ev] = src.tick([], 0.15)
    assert isinstance(ev, Replace) and sorted(o.name for o in ev.objects or ()) == ["ratings", "reviews"]
    assert src.tick([], 1.0) == [] and src.next_due() is None


def test_a_configmap_swap_is_noticed_without_an_event_on_the_key(config: Path) -> None:
    """The kubelet never touches a kept key's symlink: the change of what it resolves to is
    what `tick` notices (here with no inotify event at all)."""
    vol = ConfigMapVolume(config)
    vol.write({"mesh.yaml": service("reviews", port=1111), "gone.yaml": service("ratings")})
    src = DirectorySource([config], debounce_ms=100)
    assert [e.origin for e in src.initial() if isinstance(e, Replace)] == [str(config / "gone.yaml"),
                                                                             str(config / "mesh.yaml")]
    vol.write({"mesh.yaml": service("reviews", port=2222)})
    assert src.tick([], 10.0) == []
    events = src.tick([], 10.1)
    assert [(e.origin, [o.body["spec"]["ports"][0]["port"] for o in e.objects or ()])
            for e in events if isinstance(e, Replace)] == [(str(config / "gone.yaml"), []),
                                                           (str(config / "mesh.yaml"), [2222])]
