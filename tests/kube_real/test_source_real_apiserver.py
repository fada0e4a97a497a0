"""Meshline's Kubernetes source against a real kube-apiserver + etcd (not kmock), through
the official client. Does I/O: the session's API server (tests/kube_real/conftest.py).

What a user would notice: Services, EndpointSlices, Pods, Namespaces and mesh custom
resources created, changed and deleted through the API reach the mesh with the server's
real resourceVersions; after a real 410 Gone (etcd compacted while the watch was down)
the source relists and reports exactly what changed, a delete it never saw as an event
included; after an API-server restart the watches come back and nothing is invented.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from controlplane.model.ir import Hostname
from controlplane.model.raw import ObjectKey
from controlplane.model.store import MeshStore
from controlplane.sources.base import Delete, SourceEvent, Synced, Upsert
from controlplane.sources.kube_informer import list_function, resources, to_raw
from controlplane.sources.kubernetes import Backoff, KubernetesSource, WatchOptions
from tests.kube.objects import MESHLINE, destination_rule, endpoint_slice, pod, service, virtual_service
from tests.kube_real.cluster import RealKube

pytestmark = [pytest.mark.kube, pytest.mark.timeout(180)]

FAST = WatchOptions(backoff=Backoff(base=0.05, cap=0.5), healthy_after=1.0, watch_timeout=120)
_ns_counter = itertools.count(1)


def fresh_ns(kube: RealKube, prefix: str, labels: dict[str, str] | None = None) -> str:
    name = f"{prefix}-{next(_ns_counter)}-{int(time.time() * 1000) % 100000}"
    kube.namespace(name, labels)
    return name


def api_state(kube: RealKube, ns: str) -> dict[ObjectKey, dict[str, Any]]:
    """What the API server holds in `ns` (and the Namespace itself), as the source reports it."""
    out: dict[ObjectKey, dict[str, Any]] = {}
    for res in resources():
        resp = list_function(kube.api, res, None if not res.namespaced else ns)(_preload_content=False)
        for item in json.loads(resp.data).get("items") or []:
            raw = to_raw(res, item, ns)
            if not res.namespaced and raw.name != ns:
                continue
            out[raw.key] = dict(raw.body)
    return out


@dataclass
class Recorder:
    store: MeshStore = field(default_factory=MeshStore)
    events: list[SourceEvent] = field(default_factory=list)
    view: dict[ObjectKey, dict[str, Any]] = field(default_factory=dict)
    restarts: list[str] = field(default_factory=list)

    async def sink(self, events: list[SourceEvent]) -> None:
        for ev in events:
            if isinstance(ev, Upsert):
                self.view[ev.obj.key] = dict(ev.obj.body)
            elif isinstance(ev, Delete):
                assert ev.key in self.view, f"Delete for {ev.key}, which was never reported"
                del self.view[ev.key]
        self.events.extend(events)
        self.store.apply(events)

    def in_ns(self, ns: str) -> dict[ObjectKey, dict[str, Any]]:
        return {k: v for k, v in self.view.items() if k[1] == ns or (k[0] == "Namespace" and k[2] == ns)}

    def matches(self, kube: RealKube, ns: str) -> bool:
        return self.in_ns(ns) == api_state(kube, ns)

    @property
    def synced(self) -> bool:
        return any(isinstance(e, Synced) for e in self.events)

    def since(self, mark: int, ns: str) -> list[tuple[str, ObjectKey]]:
        out: list[tuple[str, ObjectKey]] = []
        for ev in self.events[mark:]:
            key = ev.obj.key if isinstance(ev, Upsert) else ev.key if isinstance(ev, Delete) else None
            if key is not None and (key[1] == ns or key == ("Namespace", "", ns)):
                out.append(("upsert" if isinstance(ev, Upsert) else "delete", key))
        return out


def last_events(seq: list[tuple[str, ObjectKey]]) -> dict[ObjectKey, str]:
    """key -> the last event reported for it ("upsert" | "delete")."""
    return {key: what for what, key in seq}


async def eventually(pred: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def running(kube: RealKube, **kw: Any) -> AsyncIterator[tuple[Recorder, KubernetesSource]]:
    rec = Recorder()
    kw.setdefault("options", FAST)
    src = KubernetesSource(kubeconfig=kube.kubeconfig, on_restart=rec.restarts.append, **kw)
    task = asyncio.create_task(src.run(rec.sink))
    try:
        await eventually(lambda: rec.synced or task.done(), what="Synced")
        if task.done():
            task.result()
        yield rec, src
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        alive = [t.name for t in threading.enumerate() if t.name.startswith("k8s-") and t.is_alive()]
        assert not alive, f"informer threads must stop with the source: {alive}"


def seed(kube: RealKube, ns: str) -> None:
    for name in ("reviews", "ratings"):
        kube.apply(service(name, ns))
    kube.apply(endpoint_slice("reviews", ["10.1.0.11", "10.1.0.12"], ns))
    kube.pod(pod("reviews-v1", "10.1.0.11", "reviews", ns), "10.1.0.11")
    kube.apply(virtual_service("reviews", "reviews", namespace=ns))
    kube.apply(destination_rule("reviews", "reviews", namespace=ns))


# ---------------------------------------------------------------------- create / change / delete
async def test_real_apiserver_objects_created_changed_and_deleted_reach_the_mesh(real_kube: RealKube) -> None:
    kube = real_kube
    ns = fresh_ns(kube, "src", {"meshline.io/dataplane-mode": "sidecar"})
    seed(kube, ns)
    reviews = Hostname(f"reviews.{ns}.svc.cluster.local")
    ratings = Hostname(f"ratings.{ns}.svc.cluster.local")
    async with running(kube) as (rec, src):
        # Every informer holds a real resourceVersion (it resumes instead of relisting).
        assert all(inf.rv and inf.rv.isdigit() for inf in src.informers)
        await eventually(lambda: rec.matches(kube, ns), what="view == API state")
        mesh = rec.store.mesh()
        assert {reviews, ratings} <= set(mesh.services)
        assert mesh.vs_by_host[reviews].ref.display == f"VirtualService/{ns}/reviews"
        assert sorted(ep.address for es in mesh.endpoints[reviews] for ep in es.endpoints) == [
            "10.1.0.11", "10.1.0.12"]
        body = rec.view[("Service", ns, "reviews")]
        assert (body["apiVersion"], body["kind"]) == ("v1", "Service")
        assert body["spec"]["clusterIP"]  # allocated by the real server
        assert rec.view[("Pod", ns, "reviews-v1")]["status"]["podIP"] == "10.1.0.11"

        mark = len(rec.events)
        kube.apply(service("productpage", ns))
        kube.patch("v1", "Service", "ratings", {"spec": {"ports": [
            {"name": "http", "port": 9090, "targetPort": 9090}]}}, ns)
        kube.apply(endpoint_slice("reviews", ["10.1.0.11"], ns))  # one endpoint gone
        kube.apply({**destination_rule("reviews", "reviews", namespace=ns),
                    "spec": {"host": "reviews", "subsets": [{"name": "v2", "labels": {"version": "v2"}}]}})
        kube.delete(MESHLINE, "VirtualService", "reviews", ns)
        kube.delete("v1", "Pod", "reviews-v1", ns)
        kube.patch("v1", "Namespace", ns, {"metadata": {"labels": {"meshline.io/use-waypoint": "wp"}}})
        await eventually(lambda: rec.matches(kube, ns), what="view == API state after changes")
        # Exactly the objects changed were reported, each ending as it is now. (A Pod deleted
        # on a real server is first MODIFIED with a deletionTimestamp, then DELETED.)
        assert last_events(rec.since(mark, ns)) == {
            ("Pod", ns, "reviews-v1"): "delete",
            ("VirtualService", ns, "reviews"): "delete",
            ("DestinationRule", ns, "reviews"): "upsert",
            ("EndpointSlice", ns, "reviews-1"): "upsert",
            ("Namespace", "", ns): "upsert",
            ("Service", ns, "productpage"): "upsert",
            ("Service", ns, "ratings"): "upsert",
        }
        mesh = rec.store.mesh()
        assert f"productpage.{ns}.svc.cluster.local" in mesh.services
        assert [p.port for p in mesh.services[ratings].ports] == [9090]
        assert reviews not in mesh.vs_by_host
        assert [s.name for s in mesh.dr_by_host[reviews].subsets] == ["v2"]
        assert sorted(ep.address for es in mesh.endpoints[reviews] for ep in es.endpoints) == ["10.1.0.11"]

        # A Namespace deleted (and finalized, the namespace controller's job) is reported gone.
        gone = fresh_ns(kube, "gone")
        await eventually(lambda: ("Namespace", "", gone) in rec.view, what="new Namespace seen")
        kube.delete_namespace(gone)
        await eventually(lambda: ("Namespace", "", gone) not in rec.view, what="Namespace deletion seen")
        assert sum(1 for e in rec.events if isinstance(e, Synced)) == 1
        assert not rec.restarts


async def test_real_apiserver_namespaces_option_watches_only_those(real_kube: RealKube) -> None:
    """`namespaces=[...]` watches only those namespaces: another namespace's objects never
    arrive, and only the named Namespace object is reported."""
    kube = real_kube
    mine, other = fresh_ns(kube, "mine"), fresh_ns(kube, "other")
    kube.apply(service("a", mine))
    kube.apply(service("b", other))
    async with running(kube, namespaces=[mine]) as (rec, _src):
        await eventually(lambda: rec.matches(kube, mine), what="view == API state")
        kube.apply(service("c", other))
        kube.apply(service("d", mine))
        await eventually(lambda: ("Service", mine, "d") in rec.view, what="new Service in watched namespace")
        assert not [k for k in rec.view if k[1] == other or k == ("Namespace", "", other)]


# ---------------------------------------------------------------------- 410 Gone / restarts
async def test_real_410_after_etcd_compaction_relists_and_reports_a_delete_never_seen(
        real_kube: RealKube, caplog: pytest.LogCaptureFixture) -> None:
    """While the API server is down, objects vanish from etcd (no watch event can carry
    that) and etcd is compacted past every resourceVersion the informers hold. When the
    server is back, the watches get a real 410 Gone, relist, and report exactly the
    difference: the lost deletes and nothing else."""
    kube = real_kube
    ns = fresh_ns(kube, "gone410")
    seed(kube, ns)
    caplog.set_level(logging.INFO, logger="controlplane.sources.kube_informer")
    async with running(kube) as (rec, src):
        await eventually(lambda: rec.matches(kube, ns), what="view == API state")
        held = {inf.res.kind: int(inf.rv or 0) for inf in src.informers}
        mark = len(rec.events)
        kube.stop_apiserver()
        vs_key = f"/registry/networking.meshline.io/virtualservices/{ns}/reviews"
        eps_key = f"/registry/endpointslices/{ns}/reviews-1"
        assert vs_key in kube.etcd_keys(f"/registry/networking.meshline.io/virtualservices/{ns}/")
        assert kube.etcd_delete(vs_key) == 1
        assert kube.etcd_delete(eps_key) == 1
        rev = kube.compact()
        assert rev > max(held.values())
        await asyncio.to_thread(kube.up)
        await eventually(lambda: ("VirtualService", ns, "reviews") not in rec.view
                         and ("EndpointSlice", ns, "reviews-1") not in rec.view, timeout=40,
                         what="deletes made behind the watch reported after the relist")
        await eventually(lambda: rec.matches(kube, ns), what="view == API state")
        assert sorted(rec.since(mark, ns)) == [
            ("delete", ("EndpointSlice", ns, "reviews-1")),
            ("delete", ("VirtualService", ns, "reviews")),
        ]
        assert rec.restarts, "the watches restarted"
        text = "\n".join(r.getMessage() for r in caplog.records)
        assert "410" in text and "relisting" in text, text[-2000:]
        # It is back to watching: a change made now arrives as an event.
        kube.apply(service("after", ns))
        await eventually(lambda: ("Service", ns, "after") in rec.view, what="change after the relist")


async def test_real_watch_survives_an_apiserver_restart_without_inventing_changes(real_kube: RealKube) -> None:
    kube = real_kube
    ns = fresh_ns(kube, "restart")
    seed(kube, ns)
    async with running(kube) as (rec, _src):
        await eventually(lambda: rec.matches(kube, ns), what="view == API state")
        mark = len(rec.events)
        kube.stop_apiserver()
        await asyncio.sleep(1.0)  # the watches see the connection drop and back off
        await asyncio.to_thread(kube.up)
        # Whether an informer resumed or relisted after a 410, unchanged objects produce no event.
        kube.apply(service("after-restart", ns))
        kube.delete("v1", "Service", "ratings", ns)
        await eventually(lambda: ("Service", ns, "after-restart") in rec.view
                         and ("Service", ns, "ratings") not in rec.view, timeout=40,
                         what="changes after the restart")
        await eventually(lambda: rec.matches(kube, ns), what="view == API state")
        assert sorted(rec.since(mark, ns)) == [
            ("delete", ("Service", ns, "ratings")),
            ("upsert", ("Service", ns, "after-restart")),
        ]
        assert rec.restarts
        assert sum(1 for e in rec.events if isinstance(e, Synced)) == 1
