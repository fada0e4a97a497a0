"""The shared node-proxy layout (issue 15), in process and untimed: its size adds up
(a·P + b·K + c·S + d·W, no product of two), a pod added to the node changes only that pod's
resources (plus the mesh-wide facts about its address), a new replica anywhere changes only
its service's endpoints and its address block, the endpoint-dependent part is split out so a
runtime can patch it per host, and the Sidecar scope (ports included) shapes what a pod may
reach. Pure: builds meshes and Envoy messages, no I/O."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest

from controlplane.model.mesh import Mesh
from controlplane.model.raw import RawObject
from controlplane.model.store import MeshStore
from controlplane.sources.base import Replace, Upsert
from controlplane.translate.nodeproxy import (
    block_of,
    node_shared_key,
    plan_node,
    plan_node_own,
    plan_node_shared,
    plan_node_shared_hosts,
)
from controlplane.translate.nodeproxy_envoy import host_port, service_cluster
from controlplane.translate.plan import CLUSTER, ENDPOINT, LISTENER, ResourceSpec

AMBIENT = {"meshline.io/dataplane-mode": "ambient"}
NS = 4


def _obj(kind: str, api: str, ns: str, name: str, body: dict[str, Any]) -> RawObject:
    meta = {"name": name, **({"namespace": ns} if ns else {}), **body.pop("metadata", {})}
    return RawObject(kind, api, ns, name, {"apiVersion": api, "kind": kind, "metadata": meta, **body})


def pod(ns: str, name: str, ip: str, node: str, sa: str, labels: dict[str, str]) -> RawObject:
    ann = {"meshline.io/netns": f"/var/run/netns/{name}"} if node == "n1" else {}
    return _obj("Pod", "v1", ns, name, {"metadata": {"labels": labels, "annotations": ann},
                                        "spec": {"nodeName": node, "serviceAccountName": sa},
                                        "status": {"podIP": ip, "phase": "Running"}})


def eps(ns: str, svc: str, members: Iterable[tuple[str, str]]) -> RawObject:
    return _obj("EndpointSlice", "discovery.k8s.io/v1", ns, f"{svc}-1", {
        "metadata": {"labels": {"kubernetes.io/service-name": svc}}, "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080}],
        "endpoints": [{"addresses": [ip], "targetRef": {"kind": "Pod", "name": p}} for p, ip in members]})


def mesh_objects(services: int, pods: int, identities: int) -> list[RawObject]:
    """S services x 2 replicas on other nodes (one /24 per 50 pods), P pods on n1 with K
    service accounts, each pod behind its namespace's `clients` Service."""
    out = [_obj("Namespace", "v1", "", f"ns{n}", {"metadata": {"labels": AMBIENT}}) for n in range(NS)]
    for s in range(services):
        ns, name = f"ns{s % NS}", f"svc{s}"
        out.append(_obj("Service", "v1", ns, name, {"spec": {
            "clusterIP": f"10.96.{(s + 1) >> 8}.{(s + 1) & 255}", "selector": {"app": name},
            "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}))
        members = []
        for r in range(2):
            g = 2 * s + r
            ip = f"10.1.{g // 50}.{g % 50 + 2}"
            out.append(pod(ns, f"{name}-{r}", ip, f"other{g // 50}", f"sa{s}", {"app": name}))
            members.append((f"{name}-{r}", ip))
        out.append(eps(ns, name, members))
    clients: dict[str, list[tuple[str, str]]] = {}
    for j in range(pods):
        k = j % identities
        ns = f"ns{k % NS}"
        out.append(pod(ns, f"c{j}", f"10.0.0.{j + 2}", "n1", f"client{k}", {"app": "clients"}))
        clients.setdefault(ns, []).append((f"c{j}", f"10.0.0.{j + 2}"))
    for n in range(NS):
        ns = f"ns{n}"
        out.append(_obj("Service", "v1", ns, "clients", {"spec": {
            "clusterIP": f"10.97.0.{n + 1}", "selector": {"app": "clients"},
            "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}))
        out.append(eps(ns, "clients", clients.get(ns, [])))
    return out


def store_of(objects: Iterable[RawObject]) -> MeshStore:
    store = MeshStore()
    store.apply([Replace("t", tuple(objects))])
    assert not [i.format() for i in store.object_issues() if i.severity == "error"]
    return store


def mesh_of(objects: Iterable[RawObject]) -> Mesh:
    return store_of(objects).mesh_delta()[0]


def built(specs: Iterable[ResourceSpec]) -> dict[tuple[str, str], bytes]:
    return {(s.type_url, s.name): s.make().SerializeToString(deterministic=True) for s in specs}


def size(mesh: Mesh) -> int:
    return sum(len(b) for b in built(plan_node(mesh, "n1")).values())


def count(mesh: Mesh, type_url: str) -> int:
    return sum(1 for s in plan_node(mesh, "n1") if s.type_url == type_url)


# --------------------------------------------------------------------------- growth


def test_growth_is_additive_in_pods_identities_and_services() -> None:
    """The cost of one more service does not depend on how many pods or identities the node
    has, and the cost of one more pod does not depend on how many services the mesh has."""
    b = {(s, p, k): size(mesh_of(mesh_objects(s, p, k))) for s in (20, 40) for p in (4, 8) for k in (1, 4)}
    per_40_services = [b[(40, p, k)] - b[(20, p, k)] for p in (4, 8) for k in (1, 4)]
    assert max(per_40_services) - min(per_40_services) < 0.02 * min(per_40_services), per_40_services
    per_4_pods = [b[(s, 8, 1)] - b[(s, 4, 1)] for s in (20, 40)]
    assert abs(per_4_pods[0] - per_4_pods[1]) < 0.05 * per_4_pods[0], per_4_pods
    per_3_identities = [b[(s, p, 4)] - b[(s, p, 1)] for s in (20, 40) for p in (4, 8)]
    assert max(per_3_identities) - min(per_3_identities) < 0.25 * min(per_3_identities), per_3_identities


def test_cluster_count_is_a_sum_not_a_product() -> None:
    for services, pods, identities in ((30, 6, 1), (30, 6, 6), (60, 12, 12)):
        mesh = mesh_of(mesh_objects(services, pods, identities))
        blocks = len({block_of(w.ip) for w in mesh.workloads.values() if w.ip})
        fixed = 2 + 1  # passthrough, blackhole; the scope listener's hop
        # S services and NS `clients` services; K identity clusters; one inbound cluster per pod.
        assert count(mesh, CLUSTER) == fixed + blocks + services + NS + identities + pods


# --------------------------------------------------------------------------- churn


def test_pod_added_on_the_node_changes_only_its_own_resources() -> None:
    objs = mesh_objects(20, 6, 3)
    store = store_of(objs)
    before = built(plan_node(store.mesh_delta()[0], "n1"))
    store.apply([Upsert("t", pod("ns1", "newbie", "10.0.0.99", "n1", "fresh", {"app": "clients"}))])
    after = built(plan_node(store.mesh_delta()[0], "n1"))
    changed = {k for k in after if before.get(k) != after[k]} | (before.keys() - after.keys())
    names = {n for _, n in changed}
    assert names == {
        "ambient_outbound_ns1_newbie", "ambient_hbone_ns1_newbie", "ambient_plain_ns1_newbie",
        "inbound_ambient|8080|ns1/newbie",  # its own
        "ambient_src|spiffe://cluster.local/ns/ns1/sa/fresh",  # its identity's tunnel cluster (a new identity)
        "ambient_pods|10.0.0.0/24",  # the mesh-wide map of its address to its identity
    }, names
    # Every other pod's listeners are byte-identical: none of their connections is drained.
    assert all(before[k] == after[k] for k in before if k[0] == LISTENER and "_c" in k[1])


def test_new_replica_elsewhere_changes_its_endpoints_and_its_block_only() -> None:
    store = store_of(mesh_objects(20, 6, 3))
    snap0 = built(plan_node(store.mesh_delta()[0], "n1"))
    store.apply([Upsert("t", pod("ns3", "svc3-new", "10.1.0.77", "other0", "sa3", {"app": "svc3"}))])
    snap1 = built(plan_node(store.mesh_delta()[0], "n1"))
    assert {k for k in snap1 if snap0.get(k) != snap1[k]} == {(LISTENER, "ambient_pods|10.1.0.0/24")}
    store.apply([Upsert("t", eps("ns3", "svc3", [("svc3-0", "10.1.0.8"), ("svc3-1", "10.1.0.9"),
                                                  ("svc3-new", "10.1.0.77")]))])
    mesh, delta = store.mesh_delta()
    assert delta is not None and delta.hosts == {"svc3.ns3.svc.cluster.local"}  # the endpoint fast path
    snap2 = built(plan_node(mesh, "n1"))
    vip_cluster = service_cluster("10.96.0.4", 80)
    assert {k for k in snap2 if snap1.get(k) != snap2[k]} == {(ENDPOINT, vip_cluster)}
    # ... which is exactly what the per-host planner re-plans, from either mesh.
    hosts = frozenset(delta.hosts)
    assert {(s.type_url, s.name) for s in plan_node_shared_hosts(mesh, "n1", hosts)} == {
        (CLUSTER, vip_cluster), (ENDPOINT, vip_cluster)}
    assert {(s.type_url, s.name) for s in plan_node_shared_hosts(delta.base, "n1", hosts)} == {
        (CLUSTER, vip_cluster), (ENDPOINT, vip_cluster)}


def test_own_layer_reads_no_endpoints_and_shared_layer_is_the_same_on_every_node() -> None:
    objs = mesh_objects(12, 4, 2)
    store = store_of(objs)
    mesh0 = store.mesh_delta()[0]
    store.apply([Upsert("t", eps("ns0", "svc0", [("svc0-0", "10.1.0.2")]))])  # one endpoint gone
    mesh1 = store.mesh_delta()[0]
    assert built(plan_node_own(mesh0, "n1")) == built(plan_node_own(mesh1, "n1"))
    assert built(plan_node_shared(mesh0, "n1")) != built(plan_node_shared(mesh1, "n1"))
    # The own and shared plans partition the whole plan.
    own = {(s.type_url, s.name) for s in plan_node_own(mesh1, "n1")}
    shared = {(s.type_url, s.name) for s in plan_node_shared(mesh1, "n1")}
    assert not own & shared and own | shared == {(s.type_url, s.name) for s in plan_node(mesh1, "n1")}
    assert node_shared_key(mesh1, "n1") == ("",)  # no Sidecar: every node shares one layer


# --------------------------------------------------------------------------- scope


SIDECAR = _obj("Sidecar", "networking.meshline.io/v1", "ns1", "default", {
    "spec": {"egress": [{"port": {"number": 80, "protocol": "HTTP", "name": "http"}, "hosts": ["./svc1.ns1.svc.cluster.local"]}]}})


def _scope_routes(mesh: Mesh, scope_listener: str) -> list[Any]:
    (spec,) = [s for s in plan_node(mesh, "n1") if s.type_url == LISTENER and s.name == scope_listener]
    return list(spec.args[1])


def test_sidecar_scope_limits_services_ports_and_direct_pod_calls() -> None:
    objs = mesh_objects(8, 4, 4)
    multi = _obj("Service", "v1", "ns1", "svc1", {"spec": {
        "clusterIP": "10.96.0.2", "selector": {"app": "svc1"},
        "ports": [{"name": "http", "port": 80, "targetPort": 8080}, {"name": "admin", "port": 9901}]}})
    objs = [o for o in objs if not (o.kind == "Service" and o.name == "svc1")] + [multi, SIDECAR]
    mesh = mesh_of(objs)
    specs = {(s.type_url, s.name): s for s in plan_node(mesh, "n1")}
    tag = "ambient_outbound|ns1/default@ns1"
    assert specs[(LISTENER, "ambient_outbound_ns1_c1")].args[3] == tag  # c1 runs in ns1: scoped
    assert specs[(LISTENER, "ambient_outbound_ns0_c0")].args[3] == "ambient_outbound"  # others are not
    routes = _scope_routes(mesh, tag)
    assert [(r.ranges, r.ports) for r in routes] == [(("10.96.0.2/32",), (80,))]  # port 9901 not imported
    # By pod IP: only svc1's pods (10.1.0.4, 10.1.0.5), in their block's listener.
    (block,) = [s for s in plan_node(mesh, "n1")
                if s.type_url == LISTENER and s.name.startswith("ambient_pods|ns1/default@ns1|")]
    assert [ips for _, ips in block.args[1]] == [("10.1.0.4/32", "10.1.0.5/32")]
    # The shared layer carries both ports only because an unscoped pod imports them too.
    assert (CLUSTER, service_cluster("10.96.0.2", 9901)) in {(s.type_url, s.name) for s in plan_node_shared(mesh, "n1")}


def test_ipv6_addresses_name_clusters_and_blocks_as_envoy_prints_them() -> None:
    assert host_port("fd00::1", 80) == "[fd00::1]:80"
    assert service_cluster("fd00::1", 80) == "ambient|[fd00::1]:80"
    assert block_of("fd00:10::1:7") == "fd00:10::1:0/120"
    assert block_of("10.1.2.3") == "10.1.2.0/24"


@pytest.mark.parametrize("identities", [1, 5])
def test_every_pod_labels_its_connections_with_its_own_identity(identities: int) -> None:
    mesh = mesh_of(mesh_objects(5, 10, identities))
    for s in plan_node(mesh, "n1"):
        if s.type_url == LISTENER and s.name.startswith("ambient_outbound_"):
            wl = mesh.workloads[(s.name.split("_")[2], s.name.split("_")[3])]
            assert s.args[2] == f"ambient_src|spiffe://cluster.local/ns/{wl.namespace}/sa/{wl.service_account}"


def test_node_bootstrap_enables_internal_listeners_and_closes_internal_hops_with_fin() -> None:
    from controlplane.bootstrap import NODE_RUNTIME_GUARD, BootstrapOptions, bootstrap

    doc = bootstrap(BootstrapOptions(node_id="node-n1", namespace="meshline-system", mode="node", node_name="n1"))
    assert [e["name"] for e in doc["bootstrap_extensions"]] == ["envoy.bootstrap.internal_listener"]
    (static, admin) = doc["layered_runtime"]["layers"]
    assert static["static_layer"] == {NODE_RUNTIME_GUARD: False} and "admin_layer" in admin
    sidecar = bootstrap(BootstrapOptions(node_id="s", namespace="shop"))
    assert "layered_runtime" not in sidecar  # only node proxies chain internal listeners after a tcp_proxy


def test_patching_node_proxies_per_host_gives_the_full_rebuilds_snapshot() -> None:
    """The runtime's wiring (node proxies' endpoint-dependent resources as their shared layer,
    patched per host on an endpoint-only change, their own layer kept): the patched snapshot
    equals a full rebuild's, resource for resource."""
    from controlplane.cache.snapshot import SnapshotBuilder, proxy_key
    from controlplane.model.ir import ProxyMeta
    from controlplane.translate.proxy import plan_own, plan_shared, plan_shared_hosts, shared_key

    def builder(store: MeshStore) -> SnapshotBuilder:
        return SnapshotBuilder(plan_shared, plan_own, lambda meta: shared_key(store.mesh_delta()[0], meta),
                               plan_shared_hosts)

    meta = ProxyMeta("node-n1", mode="node", namespace="meshline-system", node="n1")
    store = store_of(mesh_objects(20, 6, 3))
    patching = builder(store)
    first = patching.rebuild(store.mesh_delta()[0], [meta])[proxy_key(meta)]
    store.apply([Upsert("t", eps("ns2", "svc2", [("svc2-0", "10.1.0.6")]))])
    mesh, delta = store.mesh_delta()
    assert delta is not None
    patched = patching.rebuild(mesh, [meta], delta)[proxy_key(meta)]
    assert patching.incremental_rebuilds == 1
    # Only svc2's endpoints changed, and the own layer (every listener) is the very same object.
    assert patched.types[LISTENER] is first.types[LISTENER]
    full = builder(store).rebuild(mesh, [meta])[proxy_key(meta)]
    assert {t: {n: r.version for n, r in tr.items.items()} for t, tr in patched.types.items()} == {
        t: {n: r.version for n, r in tr.items.items()} for t, tr in full.types.items()}
