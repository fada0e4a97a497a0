"""A gateway enforces the policies that select its pod, through a real gateway Envoy (issue
18, h8 review): Istio's ingress allow-list (`remoteIpBlocks`, an ALLOW policy selecting
`istio: ingressgateway`) and "require a JWT at the ingress" (RequestAuthentication + DENY
`notRequestPrincipals: ["*"]`). The set-up of `test_gateway_e2e` (its Gateway, VirtualService
and backend on another loopback address); requests to its HTTP server."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import pytest

from tests.e2e.test_gateway_e2e import BACKEND_PORT, Env, eventually, status_of
from tests.e2e.test_jwt_accesslog_e2e import Keys
from tests.meshgen import Backend, service_yaml

pytestmark = pytest.mark.e2e
BACKEND = "127.0.0.138"

ALLOW_LIST = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ingress-allow-list, namespace: ingress}
spec:
  selector: {matchLabels: {istio: ingressgateway}}
  action: ALLOW
  rules: [{from: [{source: {remoteIpBlocks: [%s]}}]}]
"""


def require_jwt(keys: Keys) -> str:
    return f"""
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: ingress-jwt, namespace: ingress}}
spec:
  selector: {{matchLabels: {{istio: ingressgateway}}}}
  jwtRules: [{{issuer: https://issuer.test, jwks: '{json.dumps(keys.rsa_jwks())}'}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: require-jwt, namespace: ingress}}
spec:
  selector: {{matchLabels: {{istio: ingressgateway}}}}
  action: DENY
  rules: [{{from: [{{source: {{notRequestPrincipals: ["*"]}}}}]}}]
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    e = Env(tmp_path_factory.mktemp("gateway-authz"))
    port = BACKEND_PORT  # the VirtualService's destination port; another address than test_gateway_e2e's
    e.write("10-web.yaml", service_yaml("web", "shop", port, [Backend(BACKEND)]))
    try:
        e.start(backend=f"web={BACKEND}:{port}")
        e.admin = e.gateway("ingressgateway", identity=True)
        yield e
    finally:
        e.close()


def code(env: Env, *headers: str) -> int | None:
    cmd = ["curl", "-sS", "--max-time", "5", "--resolve", f"web.example.com:{env.http}:127.0.0.1",
           "-o", "/dev/null", "-w", "%{http_code}", f"http://web.example.com:{env.http}/"]
    for h in headers:
        cmd += ["-H", h]
    out = subprocess.run(cmd, capture_output=True, text=True)
    return status_of(out.stdout) if out.returncode == 0 else None


def test_ingress_allow_list_and_jwt_requirement(env: Env) -> None:
    eventually(lambda: code(env) == 200)
    # An allow-list without the client's address: refused at the gateway.
    env.write("40-policy.yaml", ALLOW_LIST % "203.0.113.0/24")
    eventually(lambda: code(env) == 403)
    # ... with it: admitted.
    env.write("40-policy.yaml", ALLOW_LIST % "127.0.0.0/8")
    eventually(lambda: code(env) == 200)
    # A JWT is required: none -> 403, a forged one -> 401, a valid one -> 200.
    keys = Keys()
    env.write("40-policy.yaml", require_jwt(keys))
    eventually(lambda: code(env) == 403)
    assert code(env, f"authorization: Bearer {keys.token(signer=keys.other)}") == 401
    assert code(env, f"authorization: Bearer {keys.token()}") == 200
    # Removed: open again.
    (env.mesh / "40-policy.yaml").unlink()
    eventually(lambda: code(env) == 200)
