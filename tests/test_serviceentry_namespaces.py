"""One host, several ServiceEntries: each client namespace gets the entry Istio's registry
gives it (issue 18, h23). Istio's `servicesExportedToNamespace` lists, for a namespace, the
services private to it, then those exported to it by name, then the public ones, and the
sidecar keeps the first of each hostname; a Kubernetes Service always keeps its name.
`Mesh.service(host, namespace)` is that lookup; the entry `Mesh.services` holds names its
clusters `outbound|<port>||<host>`, any other entry `outbound|<port>||<host>~<ns>/<name>`,
so one cluster or endpoint name never carries two different contents."""

from __future__ import annotations

from typing import Any

import pytest

from controlplane.model.ir import Hostname
from controlplane.translate.plan import CLUSTER, ENDPOINT, ROUTE
from tests.test_serviceentry import PODS, addresses, mesh_of, outbound, se

pytestmark = pytest.mark.unit

HOST = Hostname("api.shared.example")
NAMESPACES = """
apiVersion: v1
kind: Namespace
metadata: {name: team-a}
---
apiVersion: v1
kind: Namespace
metadata: {name: team-b}
---
apiVersion: v1
kind: Namespace
metadata: {name: team-c}
"""


def entry(ip: str, export: str = "") -> str:
    return f"""
hosts: [{HOST}]
location: MESH_EXTERNAL
ports: [{{number: 8443, name: http, protocol: HTTP}}]
resolution: STATIC
endpoints: [{{address: {ip}}}]
{export}
"""


def endpoints_seen(mesh: Any, namespace: str) -> dict[str, list[tuple[str, int]]]:
    """cluster name -> endpoint addresses, of every cluster of HOST a sidecar in `namespace` gets."""
    got = outbound(mesh, namespace=namespace, workload="none")
    return {n: addresses(cla) for n, cla in got.get(ENDPOINT, {}).items() if str(HOST) in n}


def test_each_namespace_gets_its_own_private_entry_and_others_none() -> None:
    mesh = mesh_of(PODS, NAMESPACES, se(entry("203.0.113.1", 'exportTo: ["."]'), "a", "team-a"),
                   se(entry("203.0.113.2", 'exportTo: ["."]'), "b", "team-b"))
    assert endpoints_seen(mesh, "team-a") == {"outbound|8443||api.shared.example": [("203.0.113.1", 8443)]}
    assert endpoints_seen(mesh, "team-b") == {"outbound|8443||api.shared.example~team-b/b": [("203.0.113.2", 8443)]}
    assert endpoints_seen(mesh, "team-c") == {}
    assert mesh.service(HOST, "team-c") is None and mesh.service(HOST, "team-b").namespace == "team-b"  # type: ignore[union-attr]
    # each entry applies wherever it is exported: nothing to warn about
    assert not [i for i in mesh.issues if i.ref.kind == "ServiceEntry"], [i.format() for i in mesh.issues]


def test_class_order_private_then_exported_by_name_then_public() -> None:
    mesh = mesh_of(PODS, NAMESPACES,
                   se(entry("203.0.113.1"), "public", "default"),
                   se(entry("203.0.113.2", "exportTo: [team-a, team-b]"), "shared", "team-c"),
                   se(entry("203.0.113.3", 'exportTo: ["."]'), "own", "team-b"))
    assert endpoints_seen(mesh, "other") == {"outbound|8443||api.shared.example": [("203.0.113.1", 8443)]}
    assert endpoints_seen(mesh, "team-a") == {
        "outbound|8443||api.shared.example~team-c/shared": [("203.0.113.2", 8443)]}
    assert endpoints_seen(mesh, "team-b") == {"outbound|8443||api.shared.example~team-b/own": [("203.0.113.3", 8443)]}
    # team-c's own entry is exported to a and b only (not "."): team-c's clients get the public one
    assert endpoints_seen(mesh, "team-c") == {"outbound|8443||api.shared.example": [("203.0.113.1", 8443)]}
    warned = {i.ref.name: i.message for i in mesh.issues if i.ref.kind == "ServiceEntry"}
    assert set(warned) == {"public", "shared"}, warned
    assert "ServiceEntry/team-c/shared for clients in namespace team-a" in warned["public"]
    assert "ServiceEntry/team-b/own for clients in namespace team-b" in warned["public"]
    assert "ServiceEntry/team-b/own for clients in namespace team-b" in warned["shared"]


def test_a_cluster_name_carries_one_content_in_every_namespace() -> None:
    mesh = mesh_of(PODS, NAMESPACES,
                   se(entry("203.0.113.1"), "public", "default"),
                   se(entry("203.0.113.2", 'exportTo: ["."]'), "a", "team-a"),
                   se(entry("203.0.113.3", 'exportTo: ["."]'), "b", "team-b"))
    seen: dict[str, bytes] = {}
    for ns in ("default", "other", "team-a", "team-b", "team-c"):
        got = outbound(mesh, namespace=ns, workload="none")
        for type_url in (CLUSTER, ENDPOINT):
            for name, msg in got.get(type_url, {}).items():
                if str(HOST) in name:
                    body = msg.SerializeToString(deterministic=True)
                    assert seen.setdefault(f"{type_url} {name}", body) == body, (ns, name)
    assert len([k for k in seen if k.startswith(CLUSTER)]) == 3


def test_routes_and_destination_rules_follow_the_namespaces_entry() -> None:
    rules = f"""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: shared, namespace: default}}
spec:
  hosts: [{HOST}]
  http: [{{route: [{{destination: {{host: {HOST}}}}}], timeout: 3s}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: a-rule, namespace: team-a}}
spec:
  host: {HOST}
  trafficPolicy: {{loadBalancer: {{simple: RANDOM}}}}
"""
    mesh = mesh_of(PODS, NAMESPACES, se(entry("203.0.113.1"), "public", "default"),
                   se(entry("203.0.113.2", 'exportTo: ["."]'), "a", "team-a"), rules)
    for ns, cluster in (("team-a", "outbound|8443||api.shared.example~team-a/a"),
                        ("other", "outbound|8443||api.shared.example")):
        got = outbound(mesh, namespace=ns, workload="none")
        targets = {r.route.cluster for cfg in got[ROUTE].values() for vh in cfg.virtual_hosts
                   if str(HOST) in vh.domains for r in vh.routes}
        assert targets == {cluster}, (ns, targets)  # the route sends to the cluster that exists
        assert cluster in got[CLUSTER]
    # team-a's DestinationRule applies to team-a's entry (the client's namespace comes first)
    assert mesh.destination_rule(HOST, "team-a").name == "a-rule"  # type: ignore[union-attr]
    lb = outbound(mesh, namespace="team-a", workload="none")[CLUSTER]["outbound|8443||api.shared.example~team-a/a"]
    assert lb.lb_policy == lb.RANDOM


def test_a_kubernetes_service_keeps_its_name_in_every_namespace() -> None:
    svc = """
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec: {clusterIP: 10.96.0.5, ports: [{name: http, port: 80}]}
"""
    mesh = mesh_of(PODS, NAMESPACES, svc, se("hosts: [web.default.svc.cluster.local]\n"
                                             "ports: [{number: 80, name: http, protocol: HTTP}]\n"
                                             "exportTo: ['.']\n", "squat", "team-a"))
    assert mesh.service(Hostname("web.default.svc.cluster.local"), "team-a").ref.kind == "Service"  # type: ignore[union-attr]
    warned = [i for i in mesh.issues if i.ref.kind == "ServiceEntry"]
    assert len(warned) == 1 and "Kubernetes Service" in warned[0].message


def test_node_proxies_route_each_entrys_address_to_its_own_endpoints() -> None:
    from controlplane.translate.nodeproxy import plan_node
    from controlplane.translate.plan import build_all
    from tests.test_ambient_serviceentry import CLIENT, NS

    def with_address(body: str, address: str) -> str:
        return body + f"addresses: [{address}]\n"

    mesh = mesh_of(NS, CLIENT, se(with_address(entry("203.0.113.1"), "240.0.0.7"), "public", "default"),
                   se(with_address(entry("203.0.113.2", 'exportTo: ["."]'), "240.0.0.8"), "own", "team-a"))
    out = build_all(plan_node(mesh, "n1"))
    assert addresses(out[ENDPOINT]["ambient|240.0.0.7:8443"]) == [("203.0.113.1", 8443)]
    # node proxies route only entries exported to every namespace (tests/test_ambient_serviceentry.py)
    assert "ambient|240.0.0.8:8443" not in out[CLUSTER]


def test_within_a_class_the_oldest_entry_wins_then_namespace_and_name() -> None:
    def aged(name: str, ns: str, ip: str, created: str | None) -> str:
        text = se(entry(ip), name, ns)
        if created is None:
            return text
        return text.replace(f"namespace: {ns}}}", f"namespace: {ns}, creationTimestamp: '{created}'}}", 1)

    # Istio's SortServicesByCreationTime: the older public entry keeps the host everywhere,
    # although its namespace/name sorts later.
    mesh = mesh_of(PODS, NAMESPACES, aged("a", "team-a", "203.0.113.1", "2026-12-02T10:00:00Z"),
                   aged("z", "team-c", "203.0.113.2", "2026-12-01T10:00:00Z"))
    assert endpoints_seen(mesh, "other") == {"outbound|8443||api.shared.example": [("203.0.113.2", 8443)]}
    assert mesh.services[HOST].name == "z"
    warned = {i.ref.name: i.message for i in mesh.issues if i.ref.kind == "ServiceEntry"}
    assert set(warned) == {"a"} and "ServiceEntry/team-c/z for clients in every namespace" in warned["a"]
    # same age (or none, as from a directory): namespace, then name
    mesh = mesh_of(PODS, NAMESPACES, aged("a", "team-c", "203.0.113.1", None), aged("z", "team-a", "203.0.113.2", None))
    assert mesh.services[HOST].name == "z"


def test_a_sidecar_egress_of_its_own_namespace_imports_that_namespaces_entry() -> None:
    sidecar = """
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: team-a}
spec:
  egress: [{hosts: ["./*"]}]
"""
    mesh = mesh_of(PODS, NAMESPACES, sidecar, se(entry("203.0.113.1"), "public", "default"),
                   se(entry("203.0.113.2", 'exportTo: ["."]'), "own", "team-a"))
    # team-a's Sidecar imports team-a's services: its own entry of the host (Istio's `./*`)
    assert endpoints_seen(mesh, "team-a") == {"outbound|8443||api.shared.example~team-a/own": [("203.0.113.2", 8443)]}
    sidecar_all = sidecar.replace('"./*"', '"*/api.shared.example"')
    mesh = mesh_of(PODS, NAMESPACES, sidecar_all, se(entry("203.0.113.1"), "public", "default"),
                   se(entry("203.0.113.2", 'exportTo: ["."]'), "own", "team-a"))
    assert endpoints_seen(mesh, "team-a") == {"outbound|8443||api.shared.example~team-a/own": [("203.0.113.2", 8443)]}
    assert endpoints_seen(mesh, "other") == {"outbound|8443||api.shared.example": [("203.0.113.1", 8443)]}


def test_a_gateway_proxy_routes_to_the_entry_its_namespace_gets() -> None:
    from controlplane.model.ir import ProxyMeta
    from controlplane.translate.plan import build_all
    from controlplane.translate.proxy import plan_proxy
    from tests.gatewayfixtures import gateway_pod, load, namespace

    gateway = f"""
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: public, namespace: edge}}
spec:
  selector: {{istio: ingressgateway}}
  servers: [{{port: {{number: 8080, name: http, protocol: HTTP}}, hosts: ["*/shop.example.com"]}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: shop, namespace: edge}}
spec:
  hosts: [shop.example.com]
  gateways: [public]
  http: [{{route: [{{destination: {{host: {HOST}}}}}]}}]
"""
    mesh, _ = load("---\n".join([namespace("edge"), gateway_pod("gw-1", "10.1.0.1"), gateway,
                                 se(entry("203.0.113.1"), "public", "default"),
                                 se(entry("203.0.113.2", 'exportTo: ["."]'), "own", "edge")]))
    meta = ProxyMeta("gw", mode="gateway", namespace="edge", workload="gw-1", gateway="edge/public")
    got = build_all(plan_proxy(mesh, meta).specs())
    own = "outbound|8443||api.shared.example~edge/own"
    targets = {r.route.cluster for cfg in got[ROUTE].values() for vh in cfg.virtual_hosts for r in vh.routes}
    assert targets == {own}  # the route and the cluster it names agree
    assert addresses(got[ENDPOINT][own]) == [("203.0.113.2", 8443)]
    assert "outbound|8443||api.shared.example" not in got[CLUSTER]
