"""ServiceEntry hosts per namespace on node proxies (issue 18, h26), in process: ambient pods
see the entries their namespace sees (a scope listener per namespace whose view differs from
the mesh-wide one, none otherwise), two entries of one address keep one cluster and warn,
an entry with several IP addresses gets a /32 and a cluster per address (and each is an
authority at its pods and at its waypoint), a `use-waypoint` label on a namespace-resolved
entry binds it for that namespace, patching the node proxy per host equals a full rebuild,
and /v1/services lists every entry of a host. Pure, no I/O (the status API through its
FastAPI test client over a directory source)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from controlplane.model.ambient import services_of_waypoint
from controlplane.model.ir import ProxyMeta
from controlplane.model.mesh import Mesh
from controlplane.model.raw import RawObject
from controlplane.model.validate import check_mesh
from controlplane.translate.ambient import plan_waypoint
from controlplane.translate.nodeproxy import node_shared_key, plan_node
from controlplane.translate.plan import CLUSTER, ENDPOINT, LISTENER, ROUTE, build_all
from tests.test_serviceentry import mesh_of

NAMESPACES = """apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {meshline.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: team, labels: {meshline.io/dataplane-mode: ambient}}
"""


def pod(ns: str, name: str, ip: str, extra: str = "") -> str:
    return (f"apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, {extra}"
            f"annotations: {{meshline.io/netns: /var/run/netns/{name}}}}}\n"
            f"spec: {{nodeName: n1, serviceAccountName: {name}}}\nstatus: {{podIP: {ip}, phase: Running}}\n")


CLIENT = pod("default", "client", "10.0.0.2")
TEAM_CLIENT = pod("team", "tclient", "10.0.0.3")


def entry(ns: str, name: str, body: str, labels: str = "") -> str:
    meta = f"{{name: {name}, namespace: {ns}" + (f", labels: {{{labels}}}" if labels else "") + "}"
    return ("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n"
            f"metadata: {meta}\nspec:\n  hosts: [pay.example]\n"
            "  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 8080}]\n  resolution: STATIC\n" + body)


PUBLIC = entry("default", "pay-public", "  addresses: [240.0.0.8]\n  endpoints: [{address: 192.0.2.8}]\n")
TEAM = entry("team", "pay-team", "  addresses: [240.0.0.9]\n  exportTo: ['.']\n  endpoints: [{address: 192.0.2.9}]\n")
WAYPOINT = ("apiVersion: v1\nkind: Service\nmetadata: {name: wp, namespace: team}\n"
            "spec: {clusterIP: 10.96.0.20, selector: {app: wp}, ports: [{name: tunnel, port: 15008}]}\n")


def specs(mesh: Mesh) -> dict[tuple[str, str], Any]:
    return {(s.type_url, s.name): s for s in plan_node(mesh, "n1")}


def scope_of(mesh: Mesh, pod_key: str) -> str:
    """The scope listener the pod's outbound listener hands its connections to."""
    return str(specs(mesh)[(LISTENER, f"ambient_outbound_{pod_key}")].args[3])


def ranges(mesh: Mesh, scope: str) -> set[str]:
    """Destination ranges the scope listener sends to service clusters."""
    return {c for route in specs(mesh)[(LISTENER, scope)].args[1] for c in route.ranges}


def addresses(cla: Any) -> list[str]:
    return [e.endpoint.address.socket_address.address for g in cla.endpoints for e in g.lb_endpoints]


def warnings(mesh: Mesh) -> dict[str, str]:
    return {f"{i.ref.name}:{i.field}": i.message for i in check_mesh(mesh)
            if i.severity == "warning" and "ambient pods" in i.message}


def test_a_mesh_without_private_entries_keeps_one_scope_listener() -> None:
    mesh = mesh_of(NAMESPACES, CLIENT, TEAM_CLIENT, PUBLIC)
    scopes = [name for (t, name) in specs(mesh) if t == LISTENER and name.startswith("ambient_outbound")
              and not name.startswith("ambient_outbound_")]
    assert scopes == ["ambient_outbound"]
    assert node_shared_key(mesh, "n1") == ("",)
    assert ranges(mesh, "ambient_outbound") == {"240.0.0.8/32"}


def test_each_namespace_reaches_the_entry_it_resolves_the_host_to() -> None:
    mesh = mesh_of(NAMESPACES, CLIENT, TEAM_CLIENT, PUBLIC, TEAM)
    assert scope_of(mesh, "default_client") == "ambient_outbound"
    assert scope_of(mesh, "team_tclient") == "ambient_outbound|@team"
    assert ranges(mesh, "ambient_outbound") == {"240.0.0.8/32"}  # the team's address passes through
    assert ranges(mesh, "ambient_outbound|@team") == {"240.0.0.9/32"}  # the public one is not team's host
    out = build_all(plan_node(mesh, "n1"))
    assert addresses(out[ENDPOINT]["ambient|240.0.0.8:80"]) == ["192.0.2.8"]
    assert addresses(out[ENDPOINT]["ambient|240.0.0.9:80"]) == ["192.0.2.9"]
    assert node_shared_key(mesh, "n1") == ("", "@team")
    assert warnings(mesh) == {}  # both are used by the ambient pods they are meant for


def test_a_private_entry_alone_is_routed_for_its_namespace_only() -> None:
    mesh = mesh_of(NAMESPACES, CLIENT, TEAM_CLIENT, TEAM)
    assert ranges(mesh, "ambient_outbound") == set()
    assert ranges(mesh, "ambient_outbound|@team") == {"240.0.0.9/32"}
    exported = TEAM.replace("exportTo: ['.']", "exportTo: [default]")  # by name to another namespace
    mesh = mesh_of(NAMESPACES, CLIENT, TEAM_CLIENT, exported)
    assert scope_of(mesh, "default_client") == "ambient_outbound|@default"
    assert scope_of(mesh, "team_tclient") == "ambient_outbound"
    assert ranges(mesh, "ambient_outbound|@default") == {"240.0.0.9/32"}
    assert ranges(mesh, "ambient_outbound") == set()


def test_two_entries_of_one_address_keep_one_cluster_and_the_other_is_warned() -> None:
    same = TEAM.replace("240.0.0.9]", "240.0.0.8]")
    mesh = mesh_of(NAMESPACES, CLIENT, TEAM_CLIENT, PUBLIC, same)
    reversed_mesh = mesh_of(same, TEAM_CLIENT, CLIENT, PUBLIC, NAMESPACES)
    out = build_all(plan_node(mesh, "n1"))
    assert addresses(out[ENDPOINT]["ambient|240.0.0.8:80"]) == ["192.0.2.8"]  # the public entry's
    assert ranges(mesh, "ambient_outbound|@team") == set()  # never the other entry's endpoints: passes through
    assert build_all(plan_node(reversed_mesh, "n1")) == out
    warned = warnings(mesh)
    assert set(warned) == {"pay-team:spec.addresses[0]"}
    text = warned["pay-team:spec.addresses[0]"]
    assert "ServiceEntry/default/pay-public" in text and "240.0.0.8" in text and "ambient|240.0.0.8" in text


def test_a_kubernetes_service_keeps_its_vip_from_an_entry_of_the_same_address() -> None:
    kube = ("apiVersion: v1\nkind: Service\nmetadata: {name: zz, namespace: default}\n"
            "spec: {clusterIP: 240.0.0.8, selector: {app: zz}, ports: [{name: http, port: 80, targetPort: 8080}]}\n")
    early = PUBLIC.replace("hosts: [pay.example]", "hosts: [aaa.example]")  # sorts before the Service's host
    mesh = mesh_of(NAMESPACES, CLIENT, early, kube)
    cluster = specs(mesh)[(CLUSTER, "ambient|240.0.0.8:80")]
    assert [(r.kind, r.name) for r in cluster.sources] == [("Service", "zz")]
    text = warnings(mesh)["pay-public:spec.addresses[0]"]
    assert "Service/default/zz" in text and "aaa.example" in text


def test_several_addresses_get_a_cluster_and_a_range_each() -> None:
    multi = PUBLIC.replace("[240.0.0.8]", "[240.0.0.11, 240.0.0.12]")
    mesh = mesh_of(NAMESPACES, CLIENT, multi)
    assert ranges(mesh, "ambient_outbound") == {"240.0.0.11/32", "240.0.0.12/32"}
    out = build_all(plan_node(mesh, "n1"))
    assert addresses(out[ENDPOINT]["ambient|240.0.0.11:80"]) == ["192.0.2.8"]
    assert addresses(out[ENDPOINT]["ambient|240.0.0.12:80"]) == ["192.0.2.8"]
    assert warnings(mesh) == {}
    cidr = PUBLIC.replace("[240.0.0.8]", "[240.0.0.11, 240.0.1.0/24]")
    mesh = mesh_of(NAMESPACES, CLIENT, cidr)
    assert ranges(mesh, "ambient_outbound") == set()
    assert "CIDR 240.0.1.0/24" in warnings(mesh)["pay-public:spec.hosts[0]"]


def test_each_address_of_a_mesh_internal_entry_is_an_authority_at_its_pods() -> None:
    server = pod("default", "api", "10.0.0.4", "labels: {app: api}, ")
    internal = PUBLIC.replace("  endpoints: [{address: 192.0.2.8}]\n",
                              "  location: MESH_INTERNAL\n  workloadSelector: {labels: {app: api}}\n").replace(
        "[240.0.0.8]", "[240.0.0.11, 240.0.0.12]")
    kube = ("apiVersion: v1\nkind: Service\nmetadata: {name: api, namespace: default}\n"
            "spec: {clusterIP: 10.96.0.9, selector: {app: api}, ports: [{name: http, port: 80, targetPort: 8080}]}\n")
    out = build_all(plan_node(mesh_of(NAMESPACES, CLIENT, server, internal, kube), "n1"))
    routes = str(out[ROUTE]["ambient_hbone_default_api"])
    assert "240.0.0.11:80" in routes and "240.0.0.12:80" in routes
    for addr in ("240.0.0.11:80", "240.0.0.12:80"):
        cla = str(out[ENDPOINT][f"ambient|{addr}"])
        assert "10.0.0.4:15008" in cla and "spiffe://cluster.local/ns/default/sa/api" in cla


def test_use_waypoint_on_a_namespace_resolved_entry_binds_it_there() -> None:
    bound = entry("team", "pay-team", "  addresses: [240.0.0.9, 240.0.0.10]\n  exportTo: ['.']\n"
                  "  endpoints: [{address: 192.0.2.9}]\n", "istio.io/use-waypoint: wp")
    mesh = mesh_of(NAMESPACES, CLIENT, TEAM_CLIENT, PUBLIC, bound, WAYPOINT)
    team_scope = specs(mesh)[(LISTENER, "ambient_outbound|@team")]
    assert [(w.chain, [r.ranges for r in w.routes]) for w in team_scope.args[2]] == [
        ("waypoint|wp.team.svc.cluster.local", [("240.0.0.9/32", "240.0.0.10/32")])]
    # default's pods: the public entry, not through the waypoint (its own VIP is a Service's)
    assert ranges(mesh, "ambient_outbound") == {"240.0.0.8/32", "10.96.0.20/32"}
    assert specs(mesh)[(LISTENER, "ambient_outbound")].args[2] == ()
    assert [s.name for s in services_of_waypoint(mesh, "team", "wp")] == ["pay-team"]
    out = build_all(plan_waypoint(mesh, ProxyMeta(node_id="wp-1", mode="waypoint", namespace="team",
                                                  workload="wp", waypoint="wp")))
    hbone = str(out[LISTENER]["waypoint_hbone"])
    assert "240.0.0.9:80" in hbone and "240.0.0.10:80" in hbone and "240.0.0.8:80" not in hbone
    assert addresses(out[ENDPOINT]["outbound|80||pay.example~team/pay-team"]) == ["192.0.2.9"]
    vhosts = out[ROUTE]["waypoint_80"].virtual_hosts  # type: ignore[attr-defined]
    pay = next(vh for vh in vhosts if "pay.example" in vh.domains)
    assert {"240.0.0.9", "240.0.0.10:80"} <= set(pay.domains)  # a Host naming either address is routed


def _raw(text: str) -> list[RawObject]:
    import yaml

    out = []
    for doc in yaml.safe_load_all(text):
        meta = doc["metadata"]
        out.append(RawObject(doc["kind"], doc["apiVersion"], meta.get("namespace", ""), meta["name"], doc))
    return out


def test_patching_per_host_with_a_namespace_view_gives_the_full_rebuilds_snapshot() -> None:
    from controlplane.cache.snapshot import SnapshotBuilder, proxy_key
    from controlplane.model.store import MeshStore
    from controlplane.sources.base import Replace, Upsert
    from controlplane.translate.proxy import plan_own, plan_shared, plan_shared_hosts, shared_key
    from tests.test_nodeproxy_plan import eps, mesh_objects, store_of

    def builder(store: MeshStore) -> SnapshotBuilder:
        return SnapshotBuilder(plan_shared, plan_own, lambda meta: shared_key(store.mesh_delta()[0], meta),
                               plan_shared_hosts)

    private = entry("ns1", "pay-ns1", "  addresses: [240.0.0.9]\n  exportTo: ['.']\n"
                    "  endpoints: [{address: 192.0.2.9}]\n")
    objects = [*mesh_objects(8, 6, 3), *_raw(PUBLIC.replace("namespace: default", "namespace: ns0")), *_raw(private)]
    meta = ProxyMeta("node-n1", mode="node", namespace="meshline-system", node="n1")
    store = store_of(objects)
    assert "@ns1" in node_shared_key(store.mesh_delta()[0], "n1")
    patching = builder(store)
    first = patching.rebuild(store.mesh_delta()[0], [meta])[proxy_key(meta)]
    store.apply([Upsert("t", eps("ns2", "svc2", [("svc2-0", "10.1.0.6")]))])
    mesh, delta = store.mesh_delta()
    assert delta is not None
    patched = patching.rebuild(mesh, [meta], delta)[proxy_key(meta)]
    assert patching.incremental_rebuilds == 1
    assert patched.types[LISTENER] is first.types[LISTENER]
    full = builder(store).rebuild(mesh, [meta])[proxy_key(meta)]
    assert {t: {n: r.version for n, r in tr.items.items()} for t, tr in patched.types.items()} == {
        t: {n: r.version for n, r in tr.items.items()} for t, tr in full.types.items()}
    assert "ambient|240.0.0.9:80" in full.types[CLUSTER].items and "ambient|240.0.0.8:80" in full.types[CLUSTER].items
    fresh = MeshStore()
    fresh.apply([Replace("t", tuple(objects))])
    assert node_shared_key(fresh.mesh_delta()[0], "n1") == node_shared_key(mesh, "n1")


def test_status_services_lists_every_entry_of_a_host(tmp_path: Path) -> None:
    from controlplane.runtime import Runtime, Settings
    from controlplane.sources.directory import DirectorySource
    from controlplane.status.app import create_app

    (tmp_path / "mesh.yaml").write_text("---\n".join([NAMESPACES, CLIENT, TEAM_CLIENT, PUBLIC, TEAM]))
    src = DirectorySource([tmp_path])
    rt = Runtime(Settings(config_dirs=(tmp_path,)), [src])
    asyncio.run(rt.sink([*src.initial()]))
    rt._synced.add(src.name)
    rt.rebuild_now()
    with TestClient(create_app(rt)) as c:
        rows = [r for r in c.get("/v1/services").json() if r["hostname"] == "pay.example"]
        team_only = c.get("/v1/services", params={"namespace": "team"}).json()
    assert [(r["namespace"], r["name"]) for r in rows] == [("default", "pay-public"), ("team", "pay-team")]
    public, team = rows
    assert public["cluster_ip"] == "240.0.0.8" and public["endpoints"] == {"ready": 1, "not_ready": 0}
    assert public["service_entry"]["resolved_by"] == ["default"]
    assert team["service_entry"]["resolved_by"] == ["team"]
    assert team["service_entry"]["registry_key"] == "pay.example~team/pay-team"
    assert team["endpoints"] == {"ready": 1, "not_ready": 0}
    assert [r["name"] for r in team_only] == ["pay-team"]
