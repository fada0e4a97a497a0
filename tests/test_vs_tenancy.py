"""VirtualService tenancy (issues 16/18): a VirtualService exported only to its own namespace
(`exportTo: ["."]`) changes what clients of that namespace get for a host, and nothing
else. Istio picks, per client namespace, among the VirtualServices visible there: the
namespace's own private one, then one exported to it by name, then a public one
(Mesh.virtual_service). Before, a private one in a namespace that sorts first took the
host from every namespace's clients."""

from __future__ import annotations

import pytest
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2

from controlplane.model.convert import convert
from controlplane.model.ir import CaptureMode, Hostname, Issue, ProxyMeta
from controlplane.model.mesh import Mesh
from controlplane.model.store import assemble
from controlplane.sources.yamlload import parse_documents
from controlplane.translate.plan import LISTENER, ROUTE, ResourceSpec, build_all
from controlplane.translate.proxy import plan_proxy
from controlplane.translate.scope import proxy_scope
from controlplane.translate.sidecar import plan_outbound

pytestmark = pytest.mark.unit

HOST = Hostname("api.bbb.svc.cluster.local")


def service(name: str, ns: str, ip: str, port: str = "{name: http, port: 8080}") -> str:
    return (f"apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\n"
            f"spec: {{clusterIP: {ip}, selector: {{app: {name}}}, ports: [{port}]}}\n")


def vs(name: str, ns: str, dest: str, export: str = "", tcp: bool = False, host: str = str(HOST)) -> str:
    kind = "tcp" if tcp else "http"
    return (f"apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}, namespace: {ns}}}\n"
            f"spec:\n  hosts: [{host}]\n" + (f"  exportTo: {export}\n" if export else "")
            + f"  {kind}: [{{route: [{{destination: {{host: {dest}}}}}]}}]\n")


SERVICES = [service("api", "bbb", "10.96.1.1"), service("api-v2", "bbb", "10.96.1.2"),
            service("api-aaa", "aaa", "10.96.1.3"), service("api-ccc", "ccc", "10.96.1.4")]
PUBLIC = vs("api", "bbb", "api-v2.bbb.svc.cluster.local")
PRIVATE = vs("api-private", "aaa", "api-aaa.aaa.svc.cluster.local", export='["."]')
V2 = "outbound|8080||api-v2.bbb.svc.cluster.local"
AAA = "outbound|8080||api-aaa.aaa.svc.cluster.local"
CCC = "outbound|8080||api-ccc.ccc.svc.cluster.local"
DIRECT = "outbound|8080||api.bbb.svc.cluster.local"


def build(*texts: str) -> tuple[Mesh, list[Issue]]:
    objects, errors = parse_documents("\n---\n".join(texts), "test.yaml")
    assert not errors, [e.format() for e in errors]
    values: list[object] = []
    issues: list[Issue] = []
    for raw in objects:
        value, found = convert(raw)
        issues.extend(found)
        if value is not None:
            values.append(value)
    mesh = assemble(values)
    return mesh, [*issues, *mesh.issues]


def outbound(mesh: Mesh, namespace: str, capture: CaptureMode = "bind") -> list[ResourceSpec]:
    meta = ProxyMeta(node_id=f"c.{namespace}", namespace=namespace, workload=None, capture=capture)
    return plan_outbound(mesh, namespace, capture, scope=proxy_scope(mesh, meta))


def routed(mesh: Mesh, namespace: str) -> set[str]:
    """The clusters a client in `namespace` sends HTTP requests for HOST to."""
    out: set[str] = set()
    for rc in build_all(outbound(mesh, namespace)).get(ROUTE, {}).values():
        for vh in rc.virtual_hosts:  # type: ignore[attr-defined]
            if HOST in vh.domains:
                for r in vh.routes:
                    out.update([r.route.cluster] if r.route.cluster else [])
                    out.update(w.name for w in r.route.weighted_clusters.clusters)
    return out


def tcp_routed(mesh: Mesh, namespace: str) -> set[str]:
    """The clusters the TCP proxy for HOST's address sends to, for an intercepted client in
    `namespace`."""
    out: set[str] = set()
    for lis in build_all(outbound(mesh, namespace, "intercept")).get(LISTENER, {}).values():
        if lis.address.socket_address.address != "10.96.1.1":  # type: ignore[attr-defined]
            continue
        for fc in lis.filter_chains:  # type: ignore[attr-defined]
            for f in fc.filters:
                if f.name == "envoy.filters.network.tcp_proxy":
                    tp = tcp_proxy_pb2.TcpProxy()
                    f.typed_config.Unpack(tp)
                    out.update([tp.cluster] if tp.cluster else [])
                    out.update(w.name for w in tp.weighted_clusters.clusters)
    return out


def test_a_private_virtual_service_routes_only_its_own_namespaces_clients() -> None:
    mesh, issues = build(*SERVICES, PUBLIC, PRIVATE)
    assert not [i for i in issues if i.severity == "error"], [i.format() for i in issues]
    assert routed(mesh, "aaa") == {AAA}  # aaa's own private VirtualService
    assert routed(mesh, "ccc") == {V2}  # everyone else: bbb's public one (was: no routing at all)
    assert routed(mesh, "bbb") == {V2}
    assert mesh.virtual_service(HOST, "ccc").name == "api"  # type: ignore[union-attr]
    assert mesh.virtual_service(HOST, "aaa").name == "api-private"  # type: ignore[union-attr]
    # what status pages show: the one the service's own namespace sees
    assert mesh.vs_by_host[HOST].name == "api"
    # neither is reported as ignored: each applies somewhere
    assert not [i for i in issues if "already claimed" in i.message], [i.format() for i in issues]


def test_without_the_public_one_other_namespaces_get_plain_service_routing() -> None:
    mesh, _ = build(*SERVICES, PRIVATE)
    assert routed(mesh, "aaa") == {AAA}
    assert routed(mesh, "ccc") == {DIRECT}


def test_exported_by_name_beats_public_and_loses_to_the_clients_own() -> None:
    named = vs("api-for-ccc", "aaa", "api-ccc.ccc.svc.cluster.local", export='["ccc"]')
    own = vs("api-own", "ccc", "api-aaa.aaa.svc.cluster.local", export='["."]')
    mesh, _ = build(*SERVICES, PUBLIC, named)
    assert routed(mesh, "ccc") == {CCC}  # exported to ccc by name, ahead of the public one
    assert routed(mesh, "aaa") == {V2}  # not exported to aaa itself
    assert routed(mesh, "ddd") == {V2}
    mesh, _ = build(*SERVICES, PUBLIC, named, own)
    assert routed(mesh, "ccc") == {AAA}  # ccc's own private one first


def test_two_public_virtual_services_for_one_host_still_conflict() -> None:
    mesh, issues = build(*SERVICES, vs("aa-first", "bbb", "api-v2.bbb.svc.cluster.local"),
                         vs("api", "ccc", "api-ccc.ccc.svc.cluster.local"))
    assert routed(mesh, "ccc") == {V2}  # the first by (namespace, name) wins everywhere, as before
    (issue,) = [i for i in issues if "already claimed" in i.message]
    assert issue.ref.display == "VirtualService/ccc/api" and "bbb/aa-first" in issue.message


def test_tcp_routes_follow_the_client_namespace_too() -> None:
    tcp_services = [service("api", "bbb", "10.96.1.1", "{name: tcp, port: 8080}"),
                    service("api-v2", "bbb", "10.96.1.2", "{name: tcp, port: 8080}"),
                    service("api-aaa", "aaa", "10.96.1.3", "{name: tcp, port: 8080}")]
    mesh, _ = build(*tcp_services, vs("api", "bbb", "api-v2.bbb.svc.cluster.local", tcp=True),
                    vs("api-private", "aaa", "api-aaa.aaa.svc.cluster.local", export='["."]', tcp=True))
    assert tcp_routed(mesh, "aaa") == {AAA}
    assert tcp_routed(mesh, "ccc") == {V2}


def test_proxies_of_a_namespace_still_share_one_layer_and_other_namespaces_get_equal_host_routing() -> None:
    """Route configurations are per client namespace (short-name domains; build_route_config
    takes the namespace), shared by the proxies of one namespace: that stays so. The virtual
    host for HOST is the same input for every namespace that sees the same VirtualService."""
    mesh, _ = build(*SERVICES, PUBLIC, PRIVATE)

    def vhost(ns: str, node: str = "c") -> object:
        meta = ProxyMeta(node_id=f"{node}.{ns}", namespace=ns, workload=None, capture="bind")
        (spec,) = [s for s in plan_proxy(mesh, meta).shared if s.type_url == ROUTE]
        (vh,) = [v for v in spec.args[3] if HOST in v.domains]
        return vh

    assert vhost("aaa", "one") == vhost("aaa", "two")
    assert vhost("ddd") == vhost("eee") != vhost("aaa")  # (bbb: its short names too)
