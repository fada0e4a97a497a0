"""Sidecarless model rules: which pods are ambient, where their netns is, which waypoint a
service uses, how policies apply per port and without a waypoint, and what `analyze`
reports. Pure (converts YAML, builds meshes)."""

from __future__ import annotations

import datetime as dt
import textwrap

import pytest

from controlplane.ca import tokens
from controlplane.ca.identity import Identity
from controlplane.model.ambient import ambient_pods_on, dataplane_mode, waypoint_service
from controlplane.model.convert import convert
from controlplane.model.ir import AuthorizationPolicy, AuthzOperation, AuthzRule, ProxyMeta, SourceRef
from controlplane.model.mesh import Mesh
from controlplane.model.policy import policies_for_port
from controlplane.sources.yamlload import parse_documents
from controlplane.translate.nodeproxy import plan_node
from controlplane.translate.plan import LISTENER, ROUTE, SECRET
from tests.ambientfixtures import API, mesh_of

BASE = """
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {meshline.io/dataplane-mode: ambient}}
---
""" + API + """---
apiVersion: v1
kind: Pod
metadata: {name: out-1, namespace: shop, labels: {app: out, meshline.io/dataplane-mode: none},
           annotations: {meshline.io/netns: /run/netns/out-1}}
spec: {nodeName: n1, containers: [{name: c}]}
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: api-2, namespace: shop, labels: {app: api}}
spec: {nodeName: n2, serviceAccountName: api, containers: [{name: c}]}
status: {podIP: 10.0.0.3}
"""


def test_ambient_membership_and_netns() -> None:
    mesh = mesh_of(BASE)
    assert dataplane_mode(mesh, mesh.workloads[("shop", "api-1")]) == "ambient"
    assert dataplane_mode(mesh, mesh.workloads[("shop", "out-1")]) == "none"  # the pod label opts out
    assert [w.name for w in ambient_pods_on(mesh, "n1")] == ["api-1"]
    assert ambient_pods_on(mesh, "n2") == []  # api-2: no netns known yet


def test_node_agent_report_gives_the_netns_and_beats_the_annotation() -> None:
    report = """
    apiVersion: meshline.io/v1
    kind: PodNetns
    metadata: {name: api-2, namespace: shop}
    node: n2
    netnsPath: /var/run/meshline/netns/shop_api-2
    ---
    apiVersion: meshline.io/v1
    kind: PodNetns
    metadata: {name: api-1, namespace: shop}
    node: n9
    netnsPath: /elsewhere
    """
    mesh = mesh_of(BASE, report)
    assert mesh.workloads[("shop", "api-2")].netns == "/var/run/meshline/netns/shop_api-2"
    assert mesh.workloads[("shop", "api-1")].netns == "/run/netns/api-1"  # a report from another node is ignored
    assert [w.name for w in ambient_pods_on(mesh, "n2")] == ["api-2"]


def test_bad_netns_annotation_names_the_field() -> None:
    objects, _ = parse_documents(textwrap.dedent("""
    apiVersion: v1
    kind: Pod
    metadata: {name: p, namespace: shop, annotations: {meshline.io/netns: relative/path}}
    spec: {containers: [{name: c}]}
    """), "in.yaml")
    value, issues = convert(objects[0])
    assert value is None
    assert any(i.field == "metadata.annotations[meshline.io/netns]" and "absolute" in i.message for i in issues)


def test_waypoint_binding_service_overrides_namespace() -> None:
    mesh = mesh_of(BASE.replace("meshline.io/dataplane-mode: ambient}", "meshline.io/dataplane-mode: ambient, "
                                "meshline.io/use-waypoint: wp}"), """
    apiVersion: v1
    kind: Service
    metadata: {name: wp, namespace: shop}
    spec: {clusterIP: 10.96.0.9, selector: {app: wp}, ports: [{name: tunnel, port: 15008}]}
    ---
    apiVersion: v1
    kind: Service
    metadata: {name: direct, namespace: shop, labels: {meshline.io/use-waypoint: none}}
    spec: {clusterIP: 10.96.0.8, selector: {app: d}, ports: [{name: http, port: 80}]}
    """)
    wp = waypoint_service(mesh, mesh.services["api.shop.svc.cluster.local"])
    assert wp is not None and wp.name == "wp"
    assert waypoint_service(mesh, mesh.services["direct.shop.svc.cluster.local"]) is None
    assert waypoint_service(mesh, mesh.services["wp.shop.svc.cluster.local"]) is None


def test_policies_for_port_decides_port_attributes() -> None:
    ref = SourceRef("AuthorizationPolicy", "shop", "p")
    rule = AuthzRule(operations=(AuthzOperation(ports=(8080,), paths=("/x",)), AuthzOperation(not_ports=(9090,))))
    ap = AuthorizationPolicy(ref, "shop", "p", rules=(rule,))
    (on_8080,) = policies_for_port((ap,), 8080)
    assert on_8080.rules[0].operations == (AuthzOperation(paths=("/x",)), AuthzOperation())
    (on_9090,) = policies_for_port((ap,), 9090)
    assert on_9090.rules == ()  # cannot match: an ALLOW policy without rules denies there
    (either,) = policies_for_port((ap,), 80, 8080)  # a service port and its target port
    assert len(either.rules[0].operations) == 2


def test_node_proxy_plan_is_only_for_its_node() -> None:
    mesh = mesh_of(BASE)
    listeners = {s.name for s in plan_node(mesh, "n1") if s.type_url == LISTENER}
    # The pod's own three, and what every pod of the node shares: its scope's listener, the
    # direct pod-IP listener of each address block, and the tunnel origination.
    assert listeners == {"ambient_outbound_shop_api-1", "ambient_hbone_shop_api-1", "ambient_plain_shop_api-1",
                         "ambient_outbound", "ambient_pods|10.0.0.0/24", "ambient_connect"}
    assert not [s for s in plan_node(mesh, "n2") if s.type_url == LISTENER]
    assert not [s for s in plan_node(mesh, "n1") if s.type_url == SECRET]  # secrets come from the CA, per identity


def test_tokens_bind_a_node() -> None:
    key = b"k" * 32
    tok = tokens.mint(key, Identity("meshline-system", "meshline-node-proxy"), dt.timedelta(hours=1), node="n1")
    ident, _, node = tokens.verify_claims(key, tok)
    assert (ident.service_account, node) == ("meshline-node-proxy", "n1")
    plain = tokens.mint(key, Identity("shop", "api"), dt.timedelta(hours=1))
    assert tokens.verify_claims(key, plain)[2] is None


L7_POLICY = """
apiVersion: security.meshline.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: shop}
spec:
  %s
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
"""


@pytest.mark.parametrize("attach, fragment", [
    ("selector: {matchLabels: {app: api}}", "L7 rules on ambient Pods (shop/api-1, shop/api-2) without a waypoint"),
    ("targetRefs: [{kind: Service, name: api}]", "Service shop/api uses no waypoint"),
    ("targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: gone}]",
     "waypoint shop/gone does not exist"),
])
def test_l7_policy_without_a_waypoint_is_reported(attach: str, fragment: str) -> None:
    mesh = mesh_of(BASE, L7_POLICY % attach)
    found = [i for i in mesh.issues if i.ref.name == "no-admin"]
    assert any(fragment in i.message and i.severity == "warning" for i in found), [i.format() for i in found]


def test_node_proxy_chains_follow_the_pods_sidecar_scope() -> None:
    other = """
    apiVersion: v1
    kind: Service
    metadata: {name: elsewhere, namespace: other}
    spec: {clusterIP: 10.96.9.9, selector: {app: x}, ports: [{name: http, port: 80}]}
    """
    narrow = """
    apiVersion: networking.meshline.io/v1
    kind: Sidecar
    metadata: {name: default, namespace: shop}
    spec: {egress: [{hosts: ["./*"]}]}
    """

    def vips(mesh: Mesh) -> set[str]:
        """The VIPs the scope listener of api-1 routes as services."""
        specs = {(s.type_url, s.name): s for s in plan_node(mesh, "n1")}
        scope = specs[(LISTENER, "ambient_outbound_shop_api-1")].args[3]
        return {c for r in specs[(LISTENER, scope)].args[1] for c in r.ranges}

    assert "10.96.9.9/32" in vips(mesh_of(BASE, other))
    scoped = vips(mesh_of(BASE, other, narrow))
    assert "10.96.9.9/32" not in scoped
    assert "10.96.0.1/32" in scoped


SIDECAR_POD = """
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Service
metadata: {name: old, namespace: legacy}
spec: {clusterIP: 10.96.5.5, selector: {app: old}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Pod
metadata: {name: old-1, namespace: legacy, labels: {app: old}, annotations: {meshline.io/status: injected}}
spec: {nodeName: n1, serviceAccountName: old, containers: [{name: c}]}
status: {podIP: 10.0.5.5}
---
apiVersion: security.meshline.io/v1
kind: AuthorizationPolicy
metadata: {name: old-deny-admin, namespace: legacy}
spec:
  targetRefs: [{kind: Service, name: old}]
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
"""


def test_service_attached_policy_is_enforced_by_sidecars_without_a_waypoint() -> None:
    from controlplane.translate.plan import build_all
    from controlplane.translate.sidecar import plan_inbound

    mesh = mesh_of(SIDECAR_POD)
    meta = ProxyMeta("old-1", namespace="legacy", workload="old-1", capture="intercept")
    listeners = build_all(plan_inbound(mesh, meta))[LISTENER]
    assert "old-deny-admin" in str(listeners["virtualInbound"])
    # With a waypoint for the service, the waypoint enforces it instead.
    with_wp = SIDECAR_POD.replace("metadata: {name: old, namespace: legacy}",
                                  "metadata: {name: old, namespace: legacy, labels: {meshline.io/use-waypoint: wp}}")
    wp_svc = """
    apiVersion: v1
    kind: Service
    metadata: {name: wp, namespace: legacy}
    spec: {clusterIP: 10.96.5.9, selector: {app: wp}, ports: [{name: tunnel, port: 15008}]}
    """
    listeners = build_all(plan_inbound(mesh_of(with_wp, wp_svc), meta))[LISTENER]
    assert "old-deny-admin" not in str(listeners["virtualInbound"])


def test_sidecar_hbone_inbound_takes_its_routes_and_policies_over_rds() -> None:
    """A sidecar's 15008 listener names its CONNECT routes (targets, L4 policies) by RDS: a
    policy change alters only that route, so the listener (and the pooled HBONE connections
    on it) stays as it is while the next tunnel gets the new policy."""
    from controlplane.translate.plan import build_all
    from controlplane.translate.sidecar import plan_inbound

    meta = ProxyMeta("old-1", namespace="legacy", workload="old-1", capture="intercept")
    before = build_all(plan_inbound(mesh_of(SIDECAR_POD), meta))
    from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2
    from google.protobuf import json_format

    hcm = http_connection_manager_pb2.HttpConnectionManager()
    (chain,) = before[LISTENER]["inbound_hbone"].filter_chains
    chain.filters[0].typed_config.Unpack(hcm)
    assert hcm.rds.route_config_name == "inbound_hbone" and not hcm.HasField("route_config")
    route = json_format.MessageToJson(before[ROUTE]["inbound_hbone"])
    assert "10.0.5.5:8080" in route and "10.96.5.5:80\"" in route and "old-deny-admin" in route
    deny_ns = """
    apiVersion: security.meshline.io/v1
    kind: AuthorizationPolicy
    metadata: {name: old-deny-shop, namespace: legacy}
    spec: {selector: {matchLabels: {app: old}}, action: DENY, rules: [{from: [{source: {namespaces: [shop]}}]}]}
    """
    after = build_all(plan_inbound(mesh_of(SIDECAR_POD, deny_ns), meta))
    assert after[LISTENER]["inbound_hbone"] == before[LISTENER]["inbound_hbone"]
    assert "old-deny-shop" in json_format.MessageToJson(after[ROUTE]["inbound_hbone"])


def test_policy_for_a_missing_namespace_waypoint_fails_closed_at_the_node_proxy() -> None:
    ghost = BASE.replace("meshline.io/dataplane-mode: ambient}", "meshline.io/dataplane-mode: ambient, "
                         "meshline.io/use-waypoint: ghost}")
    policy = L7_POLICY % "targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: ghost}]"
    (hb,) = [s for s in plan_node(mesh_of(ghost, policy), "n1")
             if s.name == "ambient_hbone_shop_api-1" and s.type_url == ROUTE]
    assert "no-admin" in str(hb.make())  # enforced (failing closed) where no waypoint can


def test_netns_annotations_are_ignored_when_not_trusted() -> None:
    from controlplane.model.store import MeshStore
    from controlplane.sources.base import Replace

    objs, _ = parse_documents(textwrap.dedent(BASE), "in.yaml")
    report = parse_documents(textwrap.dedent("""
    apiVersion: meshline.io/v1
    kind: PodNetns
    metadata: {name: api-2, namespace: shop}
    node: n2
    netnsPath: /var/run/meshline/netns/shop_api-2
    """), "agent")[0]
    store = MeshStore(netns_annotations=False)
    store.apply([Replace("cluster", tuple(objs)), Replace("node-agent:n2", tuple(report))])
    mesh = store.mesh()
    assert mesh.workloads[("shop", "api-1")].netns is None  # the pod's own claim does not count
    assert mesh.workloads[("shop", "api-2")].netns == "/var/run/meshline/netns/shop_api-2"


def test_waypoint_policies_apply_only_to_their_service() -> None:
    from controlplane.translate.ambient import plan_waypoint

    mesh_text = BASE.replace("meshline.io/dataplane-mode: ambient}", "meshline.io/dataplane-mode: ambient, "
                             "meshline.io/use-waypoint: wp}") + """
---
apiVersion: v1
kind: Service
metadata: {name: cart, namespace: shop}
spec: {clusterIP: 10.96.0.2, selector: {app: cart}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: wp, namespace: shop}
spec: {clusterIP: 10.96.0.9, selector: {app: wp}, ports: [{name: tunnel, port: 15008}]}
---
apiVersion: security.meshline.io/v1
kind: AuthorizationPolicy
metadata: {name: api-web-only, namespace: shop}
spec:
  targetRefs: [{kind: Service, name: api}]
  action: ALLOW
  rules: [{to: [{operation: {methods: [GET]}}]}]
"""
    mesh = mesh_of(mesh_text)
    (inner,) = [s for s in plan_waypoint(mesh, ProxyMeta("wp-1", mode="waypoint", namespace="shop", waypoint="wp"))
                if s.name == "waypoint_80" and s.type_url == LISTENER]
    names = [ap.name for ap in inner.args[2]]
    assert names == ["api-web-only@api", "allow-unrestricted@cart"]
    (scoped,) = [ap for ap in inner.args[2] if ap.name == "api-web-only@api"]
    assert "api.shop.svc.cluster.local" in scoped.rules[0].operations[0].hosts
    assert scoped.rules[0].operations[0].methods == ("GET",)
