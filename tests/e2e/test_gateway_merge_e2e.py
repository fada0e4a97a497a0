"""Two Istio Gateways selecting one gateway pod, served by one real Envoy (issue 18).

The gateway proxy is started WITHOUT `--gateway`: as Istio it serves every Gateway whose
selector its pod's labels include. Gateway `ingress/edge` (tests/e2e/test_gateway_e2e.py's
mesh) and Gateway `shop/api` (another namespace) both put servers on the same HTTP port and
the same HTTPS port with different hosts: plain HTTP requests for either Gateway's host are
routed by that Gateway's VirtualService on one listener; HTTPS gets each host's own
certificate by SNI. A Telemetry selecting the gateway pod logs failed requests (mode CLIENT,
as Istio treats gateways) to the proxy's stdout; successful ones are not logged.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.test_gateway_e2e import (
    BACKEND_PORT,
    Env,
    body_of,
    eventually,
    issue,
    make_ca,
    secret_yaml,
    status_of,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    e = Env(tmp_path_factory.mktemp("gateway-merge"))
    api_ca = make_ca("api-test-ca")
    (e.tmp / "api-ca.pem").write_text(api_ca[0].cert)
    e.write("21-api-secret.yaml", secret_yaml("api-cert", "ingress", issue(api_ca, "api.example.com", client=False)))
    e.write("40-api-gateway.yaml", f"""
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: api, namespace: shop}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: {e.http}, name: http, protocol: HTTP}}
    bind: 127.0.0.1
    hosts: [api.example.com]
  - port: {{number: {e.https}, name: https, protocol: HTTPS}}
    bind: 127.0.0.1
    hosts: [api.example.com]
    tls: {{mode: SIMPLE, credentialName: api-cert}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: api, namespace: shop}}
spec:
  hosts: [api.example.com]
  gateways: [shop/api]
  http:
  - route: [{{destination: {{host: web.shop.svc.cluster.local, port: {{number: {BACKEND_PORT}}}}}}}]
    headers: {{request: {{set: {{x-via: api}}}}}}
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {{name: gateway-logs, namespace: ingress}}
spec:
  selector: {{matchLabels: {{istio: ingressgateway}}}}
  accessLogging:
  - providers: [{{name: envoy}}]
    match: {{mode: CLIENT}}
    filter: {{expression: "response.code >= 400"}}
""")
    try:
        e.start()
        e.admin = e.envoy("ingressgateway", "--mode", "gateway", "--namespace", "ingress",
                          "--workload", "ingressgateway-1", "--service-account", "ingressgateway",
                          "--ca-dir", str(e.ca_dir), "--token-out", str(e.tmp / "ingressgateway.token"))
        yield e
    finally:
        e.close()


def _via(env: Env, host: str, port: int, scheme: str, ca: str = "server-ca.pem") -> str | None:
    code, out = env.curl(host, port, scheme=scheme, ca=ca)
    if code != 0 or status_of(out) != 200:
        return None
    body = body_of(out)
    return str(body["headers"].get("x-via")) if body.get("backend") == "web" else None


def test_both_gateways_hosts_on_one_http_port(env: Env) -> None:
    assert eventually(lambda: _via(env, "api.example.com", env.http, "http")) == "api"
    assert eventually(lambda: _via(env, "web.example.com", env.http, "http")) == "edge"


def test_both_gateways_certificates_on_one_https_port_by_sni(env: Env) -> None:
    assert eventually(lambda: _via(env, "api.example.com", env.https, "https", ca="api-ca.pem")) == "api"
    assert eventually(lambda: _via(env, "web.example.com", env.https, "https")) == "edge"
    # Each name gets its own Gateway's certificate: the other CA does not verify it.
    code, out = env.curl("api.example.com", env.https, ca="server-ca.pem")
    assert code == 60, out


def test_access_log_at_the_gateway_writes_failed_requests_only(env: Env) -> None:
    assert eventually(lambda: _via(env, "api.example.com", env.http, "http")) == "api"
    code, out = env.curl("nothing.example.com", env.http, scheme="http")
    assert code == 0 and status_of(out) == 404, out
    log = env.tmp / "ingressgateway.log"
    # Envoy flushes access logs in batches.
    eventually(lambda: f'"nothing.example.com:{env.http}"' in log.read_text(), timeout=30)
    text = log.read_text()
    assert " 404 " in next(line for line in text.splitlines() if f'"nothing.example.com:{env.http}"' in line)
    assert f'"api.example.com:{env.http}"' not in text  # 200s are filtered out
