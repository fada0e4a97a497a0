"""Incremental rebuilds must equal full rebuilds: after EndpointSlice-only changes the store
patches the mesh (`mesh_delta`) and the snapshot builder re-plans only those services, and
every proxy ends up with exactly the resources a from-scratch build gives it. Pure."""

from __future__ import annotations

import random

import yaml

from controlplane.cache.snapshot import Snapshot, SnapshotBuilder, proxy_key
from controlplane.model.ir import ProxyMeta
from controlplane.model.mesh import Mesh
from controlplane.model.raw import RawObject
from controlplane.model.store import MeshStore
from controlplane.sources.base import Replace, Upsert
from controlplane.sources.yamlload import parse_documents
from controlplane.translate.proxy import plan_own, plan_shared, plan_shared_hosts, shared_key
from tests.meshgen import generated_mesh

AMBIENT = """
apiVersion: v1
kind: Namespace
metadata: {name: amb, labels: {meshline.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Service
metadata: {name: amb, namespace: amb}
spec: {clusterIP: 10.97.0.1, selector: {app: amb}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Pod
metadata: {name: amb-1, namespace: amb, labels: {app: amb}}
spec: {nodeName: n1, containers: [{name: c}]}
status: {podIP: 10.1.0.1}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: amb-1, namespace: amb, labels: {kubernetes.io/service-name: amb}}
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.1.0.1], targetRef: {kind: Pod, name: amb-1}}]
---
apiVersion: networking.meshline.io/v1
kind: Sidecar
metadata: {name: narrow, namespace: scoped}
spec: {egress: [{hosts: ["bench/svc-00001.bench.svc.cluster.local", "amb/*"]}]}
"""

PROXIES = [
    ProxyMeta("bind-1", namespace="bench"),
    ProxyMeta("intercept-1", namespace="bench", capture="intercept"),
    ProxyMeta("scoped-1", namespace="scoped", capture="intercept"),
    ProxyMeta("other-ns", namespace="amb", capture="bind"),
]


def objects(text: str, origin: str) -> tuple[RawObject, ...]:
    objs, errors = parse_documents(text, origin)
    assert not errors
    return tuple(objs)


def slice_for(svc: int, ips: list[str]) -> RawObject:
    name = f"svc-{svc:05d}"
    body = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{name}-1", "namespace": "bench", "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}} for ip in ips]}
    (obj,) = objects(yaml.safe_dump(body), f"slice-{svc}.yaml")
    return obj


def view(snaps: dict[object, Snapshot]) -> dict[object, dict[str, tuple[str, dict[str, str]]]]:
    return {k: {t: (tr.version, {n: r.version for n, r in tr.items.items()}) for t, tr in s.types.items()}
            for k, s in snaps.items()}


def full(mesh: Mesh) -> dict[object, Snapshot]:
    return SnapshotBuilder(plan_shared, plan_own, lambda m: shared_key(mesh, m)).rebuild(mesh, PROXIES)


def test_endpoint_changes_patch_the_mesh_and_snapshots_like_a_full_rebuild() -> None:
    store = MeshStore()
    store.apply([Replace("mesh.yaml", objects(generated_mesh(20, 3), "mesh.yaml")),
                 Replace("amb.yaml", objects(AMBIENT, "amb.yaml"))])
    builder = SnapshotBuilder(plan_shared, plan_own, lambda m: shared_key(store.mesh(), m), plan_shared_hosts)
    mesh, delta = store.mesh_delta()
    assert delta is None
    builder.rebuild(mesh, PROXIES, delta)
    rng = random.Random(7)
    patched = 0
    for step in range(25):
        svc = rng.randrange(20)
        ips = sorted({f"10.{svc}.{rng.randrange(4)}.{rng.randrange(1, 250)}" for _ in range(rng.randrange(1, 5))})
        events = [Upsert("mesh.yaml", slice_for(svc, ips))]
        if step % 7 == 6:  # now and then also a change the fast path does not cover
            pod = AMBIENT.split("---")[2].replace("labels: {app: amb}", f"labels: {{app: amb, step: '{step}'}}")
            events.append(Upsert("amb.yaml", objects(pod, "amb.yaml")[0]))
        store.apply(events)
        mesh, delta = store.mesh_delta()
        if delta is not None:
            patched += 1
            assert delta.hosts == {f"svc-{svc:05d}.bench.svc.cluster.local"}
        # The patched mesh holds what a fresh assembly holds.
        fresh = MeshStore()
        fresh.apply([Replace("all", tuple(store.objects().values()))])
        assert {h: [s.endpoints for s in sets] for h, sets in mesh.endpoints.items()} == \
            {h: [s.endpoints for s in sets] for h, sets in fresh.mesh().endpoints.items()}
        assert [i.format() for i in mesh.issues] == [i.format() for i in fresh.mesh().issues]
        # Patched snapshots equal from-scratch ones, proxy by proxy, resource by resource.
        assert view(builder.rebuild(mesh, PROXIES, delta)) == view(full(mesh))
    assert 15 <= patched < 25 and builder.incremental_rebuilds == patched


def test_a_patched_type_lists_only_the_changed_names() -> None:
    store = MeshStore()
    store.apply([Replace("mesh.yaml", objects(generated_mesh(5, 2), "mesh.yaml"))])
    builder = SnapshotBuilder(plan_shared, plan_own, lambda m: shared_key(store.mesh(), m), plan_shared_hosts)
    mesh, _ = store.mesh_delta()
    before = builder.rebuild(mesh, PROXIES[:1])[proxy_key(PROXIES[0])]
    store.apply([Upsert("mesh.yaml", slice_for(2, ["10.9.9.9"]))])
    mesh, delta = store.mesh_delta()
    assert delta is not None
    after = builder.rebuild(mesh, PROXIES[:1], delta)[proxy_key(PROXIES[0])]
    eds = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
    assert after.types[eds].changed == {"outbound|8080||svc-00002.bench.svc.cluster.local"}
    assert after.types[eds].version != before.types[eds].version
    for t, tr in after.types.items():
        if t != eds:
            assert tr is before.types[t]  # untouched types are the very same objects


def test_layered_stream_state_behaves_like_a_dict() -> None:
    """A stream's shared-base view of what Envoy holds answers exactly like a private dict
    under the operations the stream performs (random sequence against a dict model)."""
    from controlplane.cache.resources import Resource
    from controlplane.xds.stream import Layered

    def res(n: str, v: int) -> Resource:
        return Resource(TYPE, n, f"{n}:{v}".encode())

    TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
    base = {f"r{i}": res(f"r{i}", 0) for i in range(20)}
    layered = Layered(base)
    model = dict(base)
    rng = random.Random(3)
    for step in range(400):
        n = f"r{rng.randrange(25)}"
        op = rng.randrange(4)
        if op == 0:
            r = res(n, step)
            layered[n] = r
            model[n] = r
        elif op == 1:
            assert layered.pop(n, None) is model.pop(n, None)
        elif op == 2:
            upd = {f"r{rng.randrange(25)}": res(n, step) for _ in range(3)}
            layered.update(upd)
            model.update(upd)
        else:
            assert layered.get(n) is model.get(n) and (n in layered) == (n in model)
        assert len(layered) == len(model) and dict(layered) == model
    assert base == {f"r{i}": base[f"r{i}"] for i in range(20)}  # the shared base is never written


def test_a_fixed_withheld_slice_loses_its_withheld_error() -> None:
    store = MeshStore()
    store.apply([Replace("mesh.yaml", objects(generated_mesh(3, 2), "mesh.yaml"))])
    store.mesh()
    store.apply([Upsert("mesh.yaml", slice_for(1, ["10.7.7.7"]))])
    key = ("EndpointSlice", "bench", "svc-00001-1")
    store.quarantine([key], "rejected by proxy p: bad")
    assert any("WITHHELD" in i.message for i in store.mesh().issues)
    store.apply([Upsert("mesh.yaml", slice_for(1, ["10.7.7.8"]))])  # the fix
    mesh, _ = store.mesh_delta()
    assert not any("WITHHELD" in i.message for i in mesh.issues)


def test_patched_rounds_are_followed_by_a_full_round_now_and_then() -> None:
    from controlplane.cache.snapshot import FULL_ROUND_EVERY

    store = MeshStore()
    store.apply([Replace("mesh.yaml", objects(generated_mesh(3, 2), "mesh.yaml"))])
    builder = SnapshotBuilder(plan_shared, plan_own, lambda m: shared_key(store.mesh(), m), plan_shared_hosts)
    builder.rebuild(*store.mesh_delta()[:1], PROXIES[:1])
    for i in range(FULL_ROUND_EVERY + 3):
        store.apply([Upsert("mesh.yaml", slice_for(i % 3, [f"10.8.{i}.1"]))])
        mesh, delta = store.mesh_delta()
        assert delta is not None
        builder.rebuild(mesh, PROXIES[:1], delta)
    assert builder.incremental_rebuilds == FULL_ROUND_EVERY + 2  # one of them ran in full
    assert len(builder.memo) < 3 * 10  # and dropped the superseded variants
