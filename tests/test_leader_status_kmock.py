"""High availability against the kmock API emulator: Lease-based leader election hands
over when the leader goes away, and only the leader writes CRD status conditions
(Accepted true/false with the validation message), never rewriting unchanged ones."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s

from controlplane.crdstatus import StatusWriter
from controlplane.leader import ElectionConfig, LeaderElector
from controlplane.model.store import MeshStore
from controlplane.sources.base import Upsert
from controlplane.sources.kube_informer import to_raw
from tests.kube.emulator import KubeEnv, kube_emulator, resource_for
from tests.kube.objects import virtual_service

NS = "meshline-system"


@pytest.fixture
def kube(tmp_path: Path) -> Iterator[KubeEnv]:
    with kube_emulator(tmp_path) as env:
        env.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
        yield env


def elector(env: KubeEnv, identity: str, changes: list[tuple[str, bool]], lease_s: float = 1.5) -> LeaderElector:
    # A leader renews every retry period and gives up after the renew deadline; the tests
    # pass leases long enough that a busy machine (10x slower API calls) keeps its leader.
    cfg = ElectionConfig(namespace=NS, name="meshline-leader", identity=identity, lease_duration_s=lease_s,
                         renew_deadline_s=lease_s * 2 / 3, retry_period_s=0.1)
    return LeaderElector(env.api, cfg, on_change=lambda leader: changes.append((identity, leader)))


async def wait_for(cond: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


async def test_exactly_one_leader_and_handover_on_shutdown(kube: KubeEnv) -> None:
    changes: list[tuple[str, bool]] = []
    lease_s = 15.0  # a release must not wait for this
    a, b = elector(kube, "replica-a", changes, lease_s), elector(kube, "replica-b", changes, lease_s)
    ta = asyncio.create_task(a.run())
    await wait_for(lambda: a.is_leader)
    tb = asyncio.create_task(b.run())
    await asyncio.sleep(1.0)
    assert a.is_leader and not b.is_leader
    lease = k8s.CoordinationV1Api(kube.api).read_namespaced_lease("meshline-leader", NS)
    assert lease.spec.holder_identity == "replica-a"
    # Graceful shutdown releases the Lease: b takes over without waiting for it to expire.
    ta.cancel()
    t0 = time.monotonic()
    await asyncio.gather(ta, return_exceptions=True)
    await wait_for(lambda: b.is_leader)
    assert time.monotonic() - t0 < lease_s
    tb.cancel()
    await asyncio.gather(tb, return_exceptions=True)
    assert ("replica-a", True) in changes and ("replica-b", True) in changes


async def test_a_renewal_in_flight_at_shutdown_does_not_take_the_lease_back(kube: KubeEnv) -> None:
    """Stopped while a renewal runs in its thread, the leader releases the Lease after that
    renewal, not before it (where the renewal would take the Lease back and the next replica
    would wait for the whole lease). Fault: the renewal is held until the stop has begun."""
    changes: list[tuple[str, bool]] = []
    a = elector(kube, "replica-a", changes, 15.0)
    ta = asyncio.create_task(a.run())
    await wait_for(lambda: a.is_leader)
    entered, gate, done = threading.Event(), threading.Event(), threading.Event()
    renew = a.try_acquire_or_renew

    def held_renewal() -> bool:
        entered.set()
        gate.wait(60)
        try:
            return renew()
        finally:
            done.set()

    a.try_acquire_or_renew = held_renewal  # type: ignore[method-assign]
    assert await asyncio.to_thread(entered.wait, 60)
    ta.cancel()
    await asyncio.sleep(0.3)  # the stop has begun
    gate.set()
    await asyncio.gather(ta, return_exceptions=True)
    assert await asyncio.to_thread(done.wait, 60)
    lease = k8s.CoordinationV1Api(kube.api).read_namespaced_lease("meshline-leader", NS)
    assert not lease.spec.holder_identity, f"held by {lease.spec.holder_identity} after the stop"


def _store_from_api(env: KubeEnv) -> MeshStore:
    store = MeshStore()
    objs = k8s.CustomObjectsApi(env.api).list_namespaced_custom_object(
        "networking.meshline.io", "v1", "default", "virtualservices")
    res = resource_for("networking.meshline.io/v1", "VirtualService")
    store.apply([Upsert("k8s", to_raw(res, o)) for o in objs["items"]])
    return store


def _conditions(env: KubeEnv, name: str) -> list[dict[str, Any]]:
    obj = k8s.CustomObjectsApi(env.api).get_namespaced_custom_object(
        "networking.meshline.io", "v1", "default", "virtualservices", name)
    return list((obj.get("status") or {}).get("conditions") or [])


async def test_only_the_leader_writes_status_and_unchanged_status_is_not_rewritten(kube: KubeEnv) -> None:
    kube.create(virtual_service("good", "reviews"))
    bad = virtual_service("bad", "ratings")
    bad["spec"]["http"][0]["retries"] = {"attemps": 3}
    kube.create(bad)
    leader = {"a": True, "b": False}
    writers = {}
    for name in ("a", "b"):
        store = _store_from_api(kube)
        writers[name] = StatusWriter(
            kube.api, lambda s=store: (s.objects("k8s"), s.issues_by_key(), s.quarantined()),
            is_leader=lambda n=name: leader[n])
    for w in writers.values():
        if w.is_leader():
            await asyncio.to_thread(w.write_once)
    assert writers["a"].writes == 2 and writers["b"].writes == 0
    good = _conditions(kube, "good")
    assert [c["type"] for c in good] == ["Accepted"] and good[0]["status"] == "True"
    badc = _conditions(kube, "bad")
    assert badc[0]["status"] == "False" and "attemps" in badc[0]["message"]
    # The watch shows our writes back; with nothing changed, nothing is written again.
    store = _store_from_api(kube)
    again = StatusWriter(kube.api, lambda: (store.objects("k8s"), store.issues_by_key(), store.quarantined()),
                         is_leader=lambda: True)
    assert await asyncio.to_thread(again.write_once) == 0
    # Fixing the object flips the condition once.
    fixed = virtual_service("bad", "ratings")
    kube.patch("networking.meshline.io/v1", "VirtualService", "default", "bad", {"spec": fixed["spec"]})
    store = _store_from_api(kube)
    again = StatusWriter(kube.api, lambda: (store.objects("k8s"), store.issues_by_key(), store.quarantined()),
                         is_leader=lambda: True)
    assert await asyncio.to_thread(again.write_once) == 1
    assert _conditions(kube, "bad")[0]["status"] == "True"
