"""A consumer route (an HTTPRoute in another namespace than its parent Service's) applies
only to clients in its own namespace (Gateway API GAMMA); it must never change what clients
of other namespaces get (issue 18, h8 review)."""

from __future__ import annotations

import pytest

from controlplane.model.ir import ProxyMeta
from controlplane.translate.plan import ROUTE, build_all
from controlplane.translate.scope import proxy_scope
from controlplane.translate.sidecar import plan_outbound
from tests.test_gatewayapi import HOST, SPLIT, build, conditions, route

pytestmark = pytest.mark.unit

VS = """apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http: [{route: [{destination: {host: reviews-v2}}]}]
"""
CONSUMER = route("hijack", SPLIT.replace("port: 9080,", "namespace: default, port: 9080,"), namespace="other",
                 parents="[{group: '', kind: Service, name: reviews, namespace: default}]")
GRANT = """apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: from-other, namespace: default}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: other}]
  to: [{group: '', kind: Service}]
"""


def clusters_routed(mesh: object, namespace: str) -> set[str]:
    meta = ProxyMeta(node_id="c", namespace=namespace, workload=None, capture="bind")
    built = build_all(plan_outbound(mesh, namespace, "bind", scope=proxy_scope(mesh, meta)))  # type: ignore[arg-type]
    out: set[str] = set()
    for rc in built.get(ROUTE, {}).values():
        for vh in rc.virtual_hosts:
            if HOST not in vh.domains:
                continue
            for r in vh.routes:
                if r.route.cluster:
                    out.add(r.route.cluster)
                out.update(w.name for w in r.route.weighted_clusters.clusters)
    return out


def test_a_consumer_route_applies_to_its_namespace_only_and_the_virtual_service_to_the_others() -> None:
    mesh, issues = build(VS, GRANT, CONSUMER)
    # The Service's VirtualService still routes every other namespace's clients (reviews-v2 only).
    assert mesh.vs_by_host[HOST].ref.kind == "VirtualService"  # type: ignore[index]
    assert clusters_routed(mesh, "default") == {"outbound|9080||reviews-v2.default.svc.cluster.local"}
    assert clusters_routed(mesh, "third") == {"outbound|9080||reviews-v2.default.svc.cluster.local"}
    # The consumer route is `other`'s own: its clients get the split (GEP-1426; Istio ranks a
    # namespace's own routing first), and the VirtualService is warned for that namespace.
    assert clusters_routed(mesh, "other") == {"outbound|9080||reviews-v1.default.svc.cluster.local",
                                              "outbound|9080||reviews-v2.default.svc.cluster.local"}
    assert conditions(mesh, "hijack", namespace="other")["Accepted"] == ("True", "Accepted")
    (warned,) = [i for i in issues if i.ref.kind == "VirtualService"]
    assert warned.field == "spec.hosts[0]" and "HTTPRoute other/hijack for clients in namespace other" in warned.message
    assert "every" not in warned.message
    # Without the VirtualService the consumer route applies, to its own namespace only.
    mesh, _ = build(GRANT, CONSUMER)
    assert mesh.vs_by_host[HOST].export_to == ("other",)  # type: ignore[index]
    assert clusters_routed(mesh, "third") == {"outbound|9080||reviews.default.svc.cluster.local"}
    assert conditions(mesh, "hijack", namespace="other")["Accepted"] == ("True", "Accepted")
