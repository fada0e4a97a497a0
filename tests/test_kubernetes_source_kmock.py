"""The Kubernetes source against the kmock API emulator over real HTTP, with the official
client. Does network I/O (kmock and a fault proxy on free ports, in a background thread).

What a user would notice: objects created, changed and deleted through the API reach the
mesh; a dropped watch, an API-server outage or 410 Gone neither loses a change (a delete
made while disconnected included) nor invents one; proxies get no config until every kind
is listed; `meshline serve --kubernetes` serves a cluster's services and reports its
invalid objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from controlplane.cli import main as cli_main
from controlplane.localrun import free_port, wait_http
from controlplane.metrics import Metrics
from controlplane.model.ir import Hostname
from controlplane.model.raw import ObjectKey
from controlplane.model.store import MeshStore
from controlplane.runtime import Runtime, Settings
from controlplane.sources.base import Delete, SourceEvent, Synced, Upsert
from controlplane.sources.kubernetes import Backoff, KubernetesSource, WatchOptions
from tests.kube import KubeEnv, kube_emulator
from tests.kube.objects import (
    ISTIO,
    MESHLINE,
    destination_rule,
    endpoint_slice,
    namespace,
    pod,
    service,
    virtual_service,
)

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parent.parent
FAST = WatchOptions(backoff=Backoff(base=0.05, cap=0.4), healthy_after=1.0, watch_timeout=120)
REVIEWS = Hostname("reviews.default.svc.cluster.local")
RATINGS = Hostname("ratings.default.svc.cluster.local")


# ---------------------------------------------------------------------- harness
def _no_rv(body: dict[str, Any]) -> dict[str, Any]:
    meta = {k: v for k, v in body["metadata"].items() if k != "resourceVersion"}
    return {**body, "metadata": meta}


@dataclass
class Recorder:
    """What the source delivered: every event, the resulting object view, and the store."""

    store: MeshStore = field(default_factory=MeshStore)
    events: list[SourceEvent] = field(default_factory=list)
    view: dict[ObjectKey, dict[str, Any]] = field(default_factory=dict)
    restarts: Counter[str] = field(default_factory=Counter)

    async def sink(self, events: list[SourceEvent]) -> None:
        for ev in events:
            if isinstance(ev, Upsert):
                assert ev.origin == "k8s"
                assert ev.obj.file is None and ev.obj.line is None
                self.view[ev.obj.key] = dict(ev.obj.body)
            elif isinstance(ev, Delete):
                assert ev.origin == "k8s"
                assert ev.key in self.view, f"Delete for {ev.key}, which was never reported"
                del self.view[ev.key]
        self.events.extend(events)
        self.store.apply(events)

    def matches(self, env: KubeEnv, istio_api: bool = False) -> bool:
        """The delivered view equals what the API server holds (resourceVersions aside: the
        fault proxy stamps them on the way)."""
        return {k: _no_rv(b) for k, b in self.view.items()} == env.state(istio_api)

    @property
    def synced(self) -> bool:
        return any(isinstance(e, Synced) for e in self.events)

    def since(self, mark: int) -> list[tuple[str, ObjectKey]]:
        out: list[tuple[str, ObjectKey]] = []
        for ev in self.events[mark:]:
            if isinstance(ev, Upsert):
                out.append(("upsert", ev.obj.key))
            elif isinstance(ev, Delete):
                out.append(("delete", ev.key))
        return out


async def settled(rec: Recorder, src: KubernetesSource, env: KubeEnv) -> None:
    """Synced, and every informer's watch is open at the proxy."""
    await eventually(lambda: rec.synced, what="Synced")
    await eventually(lambda: env.faults.open_watches() == len(src.informers), what="all watches open")


async def eventually(pred: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running(env: KubeEnv, **kw: Any) -> AsyncIterator[tuple[Recorder, KubernetesSource]]:
    rec = Recorder()
    kw.setdefault("options", FAST)
    src = KubernetesSource(kubeconfig=env.kubeconfig, on_restart=lambda label: rec.restarts.update([label]), **kw)
    task = asyncio.create_task(src.run(rec.sink))
    try:
        yield rec, src
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        alive = [t.name for t in threading.enumerate() if t.name.startswith("k8s-") and t.is_alive()]
        assert not alive, f"informer threads must stop with the source: {alive}"


@pytest.fixture
def kube(tmp_path: Path) -> Iterator[KubeEnv]:
    with kube_emulator(tmp_path) as env:
        env.create(namespace("default"))
        yield env


def seed(env: KubeEnv) -> None:
    env.create(service("reviews"))
    env.create(service("ratings"))
    env.create(service("details"))
    env.create(endpoint_slice("reviews", ["10.0.0.11", "10.0.0.12"]))
    env.create(pod("reviews-v1", "10.0.0.11", "reviews"))
    env.create(virtual_service("reviews", "reviews"))
    env.create(destination_rule("reviews", "reviews"))


# ---------------------------------------------------------------------- pure
def test_backoff_grows_exponentially_is_capped_and_jittered() -> None:
    b = Backoff(base=0.5, cap=30.0, jitter=0.5)
    assert [b.delay(n, rand=lambda: 0.0) for n in range(1, 9)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert b.delay(3, rand=lambda: 1.0) == 1.0  # up to half taken off at random
    assert all(1.0 <= b.delay(3) <= 2.0 for _ in range(100))


# ---------------------------------------------------------------------- API -> events -> store
# Objects created, changed and deleted through the API reaching the store, and the namespaces option,
# are tested against the real API server (tests/kube_real/test_source_real_apiserver.py); kmock is
# kept here for what a real server cannot be made to do on demand (faults, injected events).


async def test_istio_group_is_watched_only_when_asked_and_meshline_wins(kube: KubeEnv) -> None:
    kube.create(service("reviews"))
    kube.create(virtual_service("reviews", "reviews", api_version=ISTIO, regex="/istio/.*"))
    async with running(kube, istio_api=False) as (rec, _src):  # --no-istio-api (default: when served)
        await eventually(lambda: rec.synced)
        assert ("VirtualService", "default", "reviews") not in rec.view
    assert not any(r.path.startswith("/apis/networking.istio.io/v1/virtualservices") for r in kube.faults.requests)

    async with running(kube, istio_api=True) as (rec, _src):
        await eventually(lambda: rec.synced)
        key = ("VirtualService", "default", "reviews")
        assert rec.view[key]["apiVersion"] == ISTIO
        assert rec.store.mesh().vs_by_host[REVIEWS].ref.display == "VirtualService/default/reviews"
        kube.create(virtual_service("reviews", "reviews", regex="/meshline/.*"))
        await eventually(lambda: rec.view[key]["apiVersion"] == MESHLINE, what="Meshline's VS preferred")
        kube.delete(MESHLINE, "VirtualService", "default", "reviews")
        await eventually(lambda: rec.view.get(key, {}).get("apiVersion") == ISTIO, what="Istio's VS back")
        kube.delete(ISTIO, "VirtualService", "default", "reviews")
        await eventually(lambda: key not in rec.view, what="VS gone")


# ---------------------------------------------------------------------- faults
@pytest.mark.parametrize("fault", ["stream-ends", "connection-reset", "api-server-down"])
async def test_dropped_watch_loses_no_change_and_invents_none(kube: KubeEnv, fault: str) -> None:
    seed(kube)
    async with running(kube) as (rec, src):
        await settled(rec, src, kube)
        mark = len(rec.events)
        if fault == "api-server-down":
            kube.faults.set_online(False)
        else:
            kube.faults.block_watches(503)  # new watches fail while we change things
            assert kube.faults.cut_watches(abort=fault == "connection-reset") == len(src.informers)
        kube.create(service("productpage"))
        kube.patch("v1", "Service", "default", "ratings", {"metadata": {"labels": {"tier": "backend"}}})
        kube.delete("v1", "Service", "default", "details")
        kube.delete(MESHLINE, "VirtualService", "default", "reviews")
        await asyncio.sleep(0.5)  # a few retries happen meanwhile
        kube.faults.set_online(True)
        kube.faults.block_watches(None)
        await eventually(lambda: rec.matches(kube), what="view == API state")
        await eventually(lambda: kube.faults.open_watches() == len(src.informers), what="watches re-established")
        await asyncio.sleep(0.3)  # watch replays of unchanged objects must report nothing
        assert sorted(rec.since(mark)) == [
            ("delete", ("Service", "default", "details")),
            ("delete", ("VirtualService", "default", "reviews")),
            ("upsert", ("Service", "default", "productpage")),
            ("upsert", ("Service", "default", "ratings")),
        ]
        assert rec.restarts["kubernetes/Service"] >= 1
        assert "details.default.svc.cluster.local" not in rec.store.mesh().services
        # Live events flow again after the recovery.
        kube.create(service("late"))
        await eventually(lambda: ("Service", "default", "late") in rec.view)


@pytest.mark.parametrize("mode", ["event", "http"])
async def test_410_gone_relists_and_reports_exactly_the_difference(kube: KubeEnv, mode: str) -> None:
    kube.faults.versioned = True  # resourceVersions as a real API server gives them
    seed(kube)
    async with running(kube) as (rec, src):
        await settled(rec, src, kube)
        svc = next(i for i in src.informers if i.res.kind == "Service")
        assert svc.rv is not None  # a versioned server: drops resume, only 410 relists
        mark = len(rec.events)
        kube.faults.mute_watches(True)  # the watch misses these changes
        kube.create(service("productpage"))
        kube.patch("v1", "Service", "default", "ratings", {"metadata": {"labels": {"tier": "backend"}}})
        kube.delete("v1", "Service", "default", "details")
        await asyncio.sleep(0.3)
        assert rec.since(mark) == []
        lists_before = sum(1 for r in kube.faults.requests if r.path == "/api/v1/services" and not r.watch)
        assert kube.faults.expire_watches(mode, "/api/v1/services") == 1
        kube.faults.mute_watches(False)
        await eventually(lambda: rec.matches(kube), what="view == API state")
        await asyncio.sleep(0.3)
        assert sorted(rec.since(mark)) == [
            ("delete", ("Service", "default", "details")),
            ("upsert", ("Service", "default", "productpage")),
            ("upsert", ("Service", "default", "ratings")),
        ]
        lists_after = sum(1 for r in kube.faults.requests if r.path == "/api/v1/services" and not r.watch)
        assert lists_after == lists_before + 1
        if mode == "http":  # the resumed watch was answered 410, then the source relisted
            resumed = kube.faults.watch_requests("/api/v1/services")[-2]
            assert resumed.query.get("resourceVersion")
        assert rec.restarts["kubernetes/Service"] == (1 if mode == "event" else 2)  # http: the cut, then 410


async def test_watch_resumes_from_last_resource_version_and_bookmarks_move_it(kube: KubeEnv) -> None:
    kube.faults.versioned = True
    kube.create(service("reviews"))
    async with running(kube) as (rec, _src):
        await eventually(lambda: rec.synced)
        await eventually(lambda: kube.faults.open_watches("/api/v1/services") == 1)
        first = kube.faults.watch_requests("/api/v1/services")[-1]
        assert first.query["allowWatchBookmarks"] == "true"
        list_rv = first.query["resourceVersion"]  # the list's resourceVersion
        assert list_rv.isdigit()

        mark = len(rec.events)
        bookmark = {"type": "BOOKMARK", "object": {"kind": "Service", "apiVersion": "v1",
                                                   "metadata": {"resourceVersion": "bm-77"}}}
        assert kube.faults.inject(bookmark, "/api/v1/services") == 1
        await asyncio.sleep(0.2)
        kube.faults.cut_watches(path_part="/api/v1/services")
        await eventually(lambda: len(kube.faults.watch_requests("/api/v1/services")) == 2)
        assert kube.faults.watch_requests("/api/v1/services")[-1].query["resourceVersion"] == "bm-77"

        kube.create(service("ratings"))
        await eventually(lambda: ("Service", "default", "ratings") in rec.view)
        rv = rec.view[("Service", "default", "ratings")]["metadata"]["resourceVersion"]
        await eventually(lambda: kube.faults.open_watches("/api/v1/services") == 1)
        kube.faults.cut_watches(abort=True, path_part="/api/v1/services")
        await eventually(lambda: len(kube.faults.watch_requests("/api/v1/services")) == 3)
        assert kube.faults.watch_requests("/api/v1/services")[-1].query["resourceVersion"] == rv
        await asyncio.sleep(0.3)
        # No relist, and the replayed objects (unchanged) reported nothing.
        assert sum(1 for r in kube.faults.requests if r.path == "/api/v1/services" and not r.watch) == 1
        assert rec.since(mark) == [("upsert", ("Service", "default", "ratings"))]


async def test_a_quiet_watch_is_renewed_at_its_timeout_without_counting_a_restart(kube: KubeEnv) -> None:
    kube.create(service("reviews"))
    quick = WatchOptions(backoff=FAST.backoff, healthy_after=FAST.healthy_after, watch_timeout=1.0, read_grace=0.2)
    async with running(kube, options=quick) as (rec, src):
        await settled(rec, src, kube)
        # kmock ignores timeoutSeconds: the read timeout ends the quiet stream instead.
        await eventually(lambda: len(kube.faults.watch_requests("/api/v1/services")) >= 3, what="renewals")
        assert kube.faults.watch_requests("/api/v1/services")[0].query["timeoutSeconds"] == "1"
        kube.create(service("ratings"))
        await eventually(lambda: ("Service", "default", "ratings") in rec.view)
        assert not rec.restarts
        assert rec.matches(kube)


async def test_unreachable_api_server_retries_with_backoff_and_stays_unready(tmp_path: Path) -> None:
    with kube_emulator(tmp_path, online=False) as env:
        env.create(namespace("default"))
        env.create(service("reviews"))
        metrics = Metrics()
        stamps: list[float] = []

        def restarted(label: str) -> None:
            metrics.watch_restarts.labels(label).inc()
            if label == "kubernetes/Service":
                stamps.append(time.monotonic())

        # No jitter: each wait is exactly base * 2**n (capped), a lower bound on the gap
        # between two attempts however busy the machine is.
        steady = WatchOptions(backoff=Backoff(base=0.05, cap=0.4, jitter=0.0), healthy_after=FAST.healthy_after,
                              watch_timeout=FAST.watch_timeout)
        src = KubernetesSource(kubeconfig=env.kubeconfig, on_restart=restarted, options=steady)
        rt = Runtime(Settings(kubernetes=True), [src], metrics)
        task = asyncio.create_task(rt.run_sources())
        try:
            await eventually(lambda: len(stamps) >= 6, what="six attempts")
            assert not rt.ready
            assert rt.unsynced_sources() == ["kubernetes"]
            restarts = metrics.registry.get_sample_value("meshline_source_watch_restarts_total",
                                                         {"source": "kubernetes/Service"})
            assert restarts is not None and restarts >= 6  # retrying...
            gaps = [b - a for a, b in itertools.pairwise(stamps)]
            assert min(gaps[-2:]) >= 0.4 * 0.99  # ...but backing off: the waits grew to the cap
            assert rt.store.mesh().services == {}

            env.faults.set_online(True)
            await eventually(lambda: rt.ready, what="ready once the API server is up")
            assert REVIEWS in rt.store.mesh().services
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_not_ready_until_every_kind_is_listed(kube: KubeEnv) -> None:
    kube.create(service("reviews"))
    kube.faults.fail("/virtualservices", 503)
    metrics = Metrics()
    src = KubernetesSource(kubeconfig=kube.kubeconfig, options=FAST,
                           on_restart=lambda label: metrics.watch_restarts.labels(label).inc())
    rt = Runtime(Settings(kubernetes=True), [src], metrics)
    task = asyncio.create_task(rt.run_sources())
    try:
        await eventually(lambda: REVIEWS in rt.store.mesh().services, what="services listed")
        await eventually(lambda: (metrics.registry.get_sample_value(
            "meshline_source_watch_restarts_total", {"source": "kubernetes/VirtualService"}) or 0) >= 1,
            what="the VirtualService list retried")
        await asyncio.sleep(0.5)
        assert not rt.ready
        kube.faults.fail("/virtualservices", None)
        await eventually(lambda: rt.ready, what="ready")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_resource_the_server_does_not_serve_counts_as_empty(kube: KubeEnv) -> None:
    kube.create(service("reviews"))
    kube.faults.fail("/destinationrules", 404)  # the CRD is not installed
    async with running(kube) as (rec, _src):
        await eventually(lambda: rec.synced, what="Synced despite the missing CRD")
        assert ("Service", "default", "reviews") in rec.view
        kube.create(destination_rule("reviews", "reviews"))
        kube.faults.fail("/destinationrules", None)  # installed now
        await eventually(lambda: ("DestinationRule", "default", "reviews") in rec.view, what="the DR")
        assert rec.matches(kube)


# ---------------------------------------------------------------------- CLI
def test_serve_flag_combinations_are_checked(tmp_path: Path) -> None:
    cfg = tmp_path / "kubeconfig"
    cfg.write_text("{}")
    runner = CliRunner()
    r = runner.invoke(cli_main, ["serve", "--kubeconfig", str(cfg)])
    assert r.exit_code == 2 and "--kubeconfig requires --kubernetes" in r.output
    r = runner.invoke(cli_main, ["serve", "--kubernetes", "--kubeconfig", str(cfg), "--watch-namespaces", "a,b",
                                 "--namespace", "c"])
    assert r.exit_code == 2 and "not both" in r.output
    no_cluster = {"KUBECONFIG": "", "KUBERNETES_SERVICE_HOST": ""}
    r = runner.invoke(cli_main, ["serve", "--kubernetes"], env=no_cluster)
    assert r.exit_code == 2 and "--kubernetes needs --kubeconfig" in r.output
    r = runner.invoke(cli_main, ["serve", "--istio-api"])
    assert r.exit_code == 2 and "--istio-api requires --kubernetes" in r.output


def _get(url: str) -> Any:
    return httpx.get(url, timeout=2).json()


def test_meshline_serve_kubernetes_subprocess(kube: KubeEnv, tmp_path: Path) -> None:
    status = f"127.0.0.1:{free_port()}"
    xds = f"127.0.0.1:{free_port()}"
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "controlplane", "serve", "--kubernetes", "--kubeconfig", str(kube.kubeconfig),
         "--status-address", status, "--xds-address", xds, "--debounce-ms", "20", "--log-level", "debug"],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "KUBECONFIG": "/nonexistent"},
    )
    base = f"http://{status}"

    def wait_for(pred: Callable[[], bool], what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            if proc.poll() is not None:
                raise AssertionError(f"serve exited ({proc.returncode}):\n{(tmp_path / 'serve.log').read_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}:\n{(tmp_path / 'serve.log').read_text()}")
            time.sleep(0.05)

    try:
        wait_http(f"{base}/readyz", timeout=30, proc=proc)
        assert _get(f"{base}/v1/services") == []  # no samples/bookinfo default with --kubernetes alone

        kube.create(service("reviews"))
        kube.create(endpoint_slice("reviews", ["10.0.0.11"]))
        wait_for(lambda: [s["hostname"] for s in _get(f"{base}/v1/services")] == [REVIEWS], "the Service")

        kube.create(virtual_service("broken", "reviews", regex="(unclosed"))
        wait_for(lambda: any(e["object"] == "VirtualService/default/broken" for e in _get(f"{base}/v1/config/errors")),
                 "the invalid VirtualService reported")
        err = next(e for e in _get(f"{base}/v1/config/errors") if e["object"] == "VirtualService/default/broken")
        assert err["severity"] == "error" and err["file"] is None
        assert err["field"].startswith("spec.http[0].match[0].uri")

        kube.create(virtual_service("reviews", "reviews"))
        wait_for(lambda: _get(f"{base}/v1/services")[0]["virtual_service"] == "VirtualService/default/reviews",
                 "the VirtualService applied")

        kube.faults.cut_watches(abort=True)
        wait_for(lambda: 'source="kubernetes/Service"' in httpx.get(f"{base}/metrics", timeout=2).text,
                 "watch restarts counted")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        log.close()
    text = (tmp_path / "serve.log").read_text()
    assert "Traceback" not in text, text
