"""Gateway API backendRefs that cannot be used (issue 18, h23): requests that would have gone
to an invalid backend get 500, also for their share of a split, while the valid backends keep
theirs (Gateway API HTTPRoute spec, `backendRefs`; Istio does the same with the route's
`cluster_not_found_response_code`). The route status says why (`ResolvedRefs=False`)."""

from __future__ import annotations

import pytest
from envoy.config.route.v3 import route_components_pb2 as rc

from controlplane.model.ir import ProxyMeta
from controlplane.translate.plan import ROUTE, build_all
from controlplane.translate.scope import proxy_scope
from controlplane.translate.sidecar import plan_outbound
from tests.test_gatewayapi import HOST, build, conditions, route

pytestmark = pytest.mark.unit


def routes_for(mesh: object, namespace: str = "default", host: str = HOST) -> dict[str, rc.Route]:
    """Envoy routes of `host`'s virtual host in the sidecar config of `namespace`, by name."""
    meta = ProxyMeta(node_id="c", namespace=namespace, workload=None, capture="bind")
    built = build_all(plan_outbound(mesh, namespace, "bind", scope=proxy_scope(mesh, meta)))  # type: ignore[arg-type]
    out: dict[str, rc.Route] = {}
    for cfg in built.get(ROUTE, {}).values():
        for vh in cfg.virtual_hosts:
            if host in vh.domains:
                out.update({r.name: r for r in vh.routes})
    return out


@pytest.mark.parametrize(("backend", "reason"), [
    ("{name: gone, port: 9080, weight: 20}", "BackendNotFound"),
    ("{name: reviews-v2, port: 1, weight: 20}", "BackendNotFound"),
    ("{name: ratings, namespace: other, port: 9080, weight: 20}", "RefNotPermitted"),
    ("{group: example.com, kind: Bucket, name: b, weight: 20}", "InvalidKind"),
])
def test_the_invalid_share_of_a_split_answers_500_and_the_valid_share_is_kept(backend: str, reason: str) -> None:
    rules = f"""\
  - backendRefs:
    - {{name: reviews-v1, port: 9080, weight: 80}}
    - {backend}
"""
    mesh, issues = build(route("split", rules))
    assert conditions(mesh, "split")["ResolvedRefs"] == ("False", reason)
    assert any(i.ref.name == "split" and reason in i.message for i in issues), issues
    (r,) = routes_for(mesh).values()
    ra = r.route
    weights = {c.name: c.weight.value for c in ra.weighted_clusters.clusters}
    assert weights["outbound|9080||reviews-v1.default.svc.cluster.local"] == 80
    (bad,) = [n for n in weights if "invalid-backend.meshline" in n]
    assert weights[bad] == 20
    assert ra.cluster_not_found_response_code == rc.RouteAction.INTERNAL_SERVER_ERROR


def test_a_valid_split_keeps_envoys_default_for_a_missing_cluster() -> None:
    rules = """\
  - backendRefs:
    - {name: reviews-v1, port: 9080, weight: 80}
    - {name: reviews-v2, port: 9080, weight: 20}
"""
    mesh, _ = build(route("split", rules))
    (r,) = routes_for(mesh).values()
    assert len(r.route.weighted_clusters.clusters) == 2
    assert r.route.cluster_not_found_response_code == rc.RouteAction.SERVICE_UNAVAILABLE  # 503, the default


def test_a_rule_whose_only_live_backend_is_invalid_answers_500() -> None:
    rules = """\
  - backendRefs:
    - {name: reviews-v1, port: 9080, weight: 0}
    - {name: gone, port: 9080, weight: 5}
"""
    mesh, _ = build(route("split", rules))
    (r,) = routes_for(mesh).values()
    assert "invalid-backend.meshline" in r.route.cluster
    assert r.route.cluster_not_found_response_code == rc.RouteAction.INTERNAL_SERVER_ERROR
