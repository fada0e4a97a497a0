"""Consumer routes from several namespaces for one Service (Gateway API GEP-1426, issue 18,
h23): a route in the Service's namespace (producer) applies to every client, a route in
another namespace (consumer) to the clients of that namespace only; each namespace gets its
own route table, and namespaces whose tables are equal share the serialized bytes. A
VirtualService for the same host competes the way Istio selects VirtualServices (its
namespace's own first, then exported to it by name, then public), a route first within one
class; where a route takes the host from a VirtualService, the VirtualService is warned."""

from __future__ import annotations

import pytest

from controlplane.cache.resources import ResourceMemo
from controlplane.model.ir import Issue, ProxyMeta
from controlplane.model.mesh import Mesh
from controlplane.translate.plan import ROUTE, build_all
from controlplane.translate.scope import proxy_scope
from controlplane.translate.sidecar import plan_outbound
from tests.test_gatewayapi import HOST, build, conditions, route

pytestmark = pytest.mark.unit

V1 = "outbound|9080||reviews-v1.default.svc.cluster.local"
V2 = "outbound|9080||reviews-v2.default.svc.cluster.local"
PLAIN = "outbound|9080||reviews.default.svc.cluster.local"
PARENT = "[{group: '', kind: Service, name: reviews, namespace: default, port: 9080}]"
GRANT = """apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: from-all, namespace: default}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: team-a},
         {group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: team-b}]
  to: [{group: '', kind: Service}]
"""


def to(backend: str, ns: str = "default") -> str:
    return f"  - backendRefs: [{{name: {backend}, namespace: {ns}, port: 9080}}]\n"


def vs(name: str, namespace: str, dest: str, export: str = "") -> str:
    return f"""apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  hosts: [{HOST}]
  {export}
  http: [{{route: [{{destination: {{host: {dest}.default.svc.cluster.local}}}}]}}]
"""


def routed(mesh: Mesh, namespace: str) -> set[str]:
    """The clusters the sidecars of `namespace` send requests for the reviews host to."""
    meta = ProxyMeta(node_id="c", namespace=namespace, workload=None, capture="bind")
    built = build_all(plan_outbound(mesh, namespace, "bind", scope=proxy_scope(mesh, meta)))
    out: set[str] = set()
    for cfg in built.get(ROUTE, {}).values():
        for vh in cfg.virtual_hosts:
            if HOST in vh.domains:
                for r in vh.routes:
                    out.update([r.route.cluster] if r.route.cluster else [])
                    out.update(w.name for w in r.route.weighted_clusters.clusters)
    return out


def warnings_of(issues: list[Issue], kind: str = "VirtualService") -> list[Issue]:
    return [i for i in issues if i.ref.kind == kind and i.severity == "warning"]


def test_each_namespace_gets_its_consumer_routes_and_the_others_the_producer_routes() -> None:
    producer = route("prod", to("reviews-v1"), parents=PARENT)
    team_a = route("mine", to("reviews-v2"), parents=PARENT, namespace="team-a")
    team_b = route("mine", to("reviews-v2") + "    filters: [{type: RequestHeaderModifier, requestHeaderModifier: "
                   "{set: [{name: x-team, value: b}]}}]\n", parents=PARENT, namespace="team-b")
    mesh, issues = build(GRANT, producer, team_a, team_b)
    for name, ns in (("prod", "default"), ("mine", "team-a"), ("mine", "team-b")):
        assert conditions(mesh, name, namespace=ns) == {"Accepted": ("True", "Accepted"),
                                                        "ResolvedRefs": ("True", "ResolvedRefs")}
    assert routed(mesh, "default") == {V1} and routed(mesh, "elsewhere") == {V1}
    assert routed(mesh, "team-a") == {V2} and routed(mesh, "team-b") == {V2}
    assert mesh.virtual_service(HOST, "team-b").namespace == "team-b"  # type: ignore[union-attr]
    assert not warnings_of(issues, "HTTPRoute")
    # Without the producer route, namespaces without a consumer route get the plain Service.
    mesh, _ = build(GRANT, team_a, team_b)
    assert routed(mesh, "elsewhere") == {PLAIN} and routed(mesh, "default") == {PLAIN}
    assert routed(mesh, "team-a") == {V2}


def test_namespaces_with_equal_route_tables_share_one_serialized_route_configuration() -> None:
    producer = route("prod", to("reviews-v1"), parents=PARENT)
    team_a = route("mine", to("reviews-v2"), parents=PARENT, namespace="team-a")
    mesh, _ = build(GRANT, producer, team_a)
    memo = ResourceMemo()

    def route_config(namespace: str) -> object:
        meta = ProxyMeta(node_id="c", namespace=namespace, workload=None, capture="bind")
        specs = [s for s in plan_outbound(mesh, namespace, "bind", scope=proxy_scope(mesh, meta))
                 if s.type_url == ROUTE and s.name == "9080"]
        (spec,) = specs
        return memo.realize(spec)

    x, y, a = route_config("ns-x"), route_config("ns-y"), route_config("team-a")
    assert x is y  # one Resource, serialized once, for both namespaces
    assert a is not x and a.body != x.body  # type: ignore[attr-defined]


def test_a_producer_route_takes_the_host_from_a_public_virtual_service_with_a_warning() -> None:
    mesh, issues = build(vs("reviews", "default", "reviews-v2"), route("prod", to("reviews-v1"), parents=PARENT))
    assert routed(mesh, "default") == {V1} and routed(mesh, "other") == {V1}
    (w,) = warnings_of(issues)
    assert w.field == "spec.hosts[0]" and "HTTPRoute default/prod for clients in every namespace" in w.message


def test_a_virtual_service_exported_to_a_namespace_by_name_beats_a_producer_route_there() -> None:
    # Istio's class order: exported to the client's namespace by name comes before public.
    mesh, issues = build(vs("for-a", "ops", "reviews-v2", "exportTo: [team-a]"),
                         route("prod", to("reviews-v1"), parents=PARENT))
    assert routed(mesh, "team-a") == {V2}
    assert routed(mesh, "default") == {V1} and routed(mesh, "ops") == {V1}
    assert not warnings_of(issues)  # it applies wherever it is visible


def test_a_consumer_route_beats_its_namespaces_public_and_private_virtual_services() -> None:
    team_a = route("mine", to("reviews-v2"), parents=PARENT, namespace="team-a")
    mesh, issues = build(GRANT, vs("public", "team-a", "reviews-v1"), team_a)
    assert routed(mesh, "team-a") == {V2}  # the namespace's own route
    assert routed(mesh, "default") == {V1}  # the public VirtualService elsewhere
    (w,) = warnings_of(issues)
    assert "HTTPRoute team-a/mine for clients in namespace team-a" in w.message
    mesh, issues = build(GRANT, vs("private", "team-a", "reviews-v1", 'exportTo: ["."]'), team_a)
    assert routed(mesh, "team-a") == {V2} and routed(mesh, "default") == {PLAIN}
    (w,) = warnings_of(issues)
    assert w.ref.name == "private" and "team-a/mine" in w.message
