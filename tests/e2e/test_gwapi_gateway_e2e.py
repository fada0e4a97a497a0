"""A Gateway API `Gateway` of class `meshline` end to end (issue 18): `meshline serve --ca-dir`
on a directory, a real Envoy started with `meshline bootstrap --mode gateway --gateway public`
(its pod labelled `gateway.networking.k8s.io/gateway-name: public`), two plain HTTP backends,
curl and httpx as the outside clients.

- HTTPS listener (TLS Terminate, certificateRefs to a Secret of the Gateway's namespace):
  curl verifies the certificate against the test CA and reaches a backend of the HTTPRoute
  attached to the Gateway; the route's request header filter is applied.
- HTTP listener: the route's 80/20 split is seen over 200 requests.
- Status: the route is Accepted by meshline.io/gateway-controller; the Gateway is Programmed
  with one attached route per listener (`GET /v1/routes`, `GET /v1/gateways`).
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from controlplane.localrun import free_port, start_envoy, stop, wait_http
from tests.e2e.conftest import start_backends, started
from tests.e2e.test_gateway_e2e import body_of, eventually, issue, make_ca, secret_yaml, status_of
from tests.meshgen import Backend, service_yaml

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]
BACKENDS = {"web-a": "127.0.0.141", "web-b": "127.0.0.142"}
PORT = 19141


class Env:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.mesh = tmp / "mesh"
        self.mesh.mkdir()
        self.ca_dir = tmp / "ca"
        self.xds, self.status, self.https, self.http = free_port(), free_port(), free_port(), free_port()
        self.procs: list[subprocess.Popen[bytes]] = []
        ca = make_ca("gwapi-test-ca")
        (tmp / "ca.pem").write_text(ca[0].cert)
        docs = [
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: edge}\n",
            *(service_yaml(name, "shop", PORT, [Backend(ip)]) for name, ip in BACKENDS.items()),
            secret_yaml("public-cert", "edge", issue(ca, "web.example.com", client=False)),
            f"""apiVersion: v1
kind: Pod
metadata: {{name: public-1, namespace: edge, labels: {{gateway.networking.k8s.io/gateway-name: public}}}}
spec: {{serviceAccountName: public, containers: [{{name: envoy, image: x}}]}}
status: {{podIP: 127.0.0.1}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {{name: meshline}}
spec: {{controllerName: meshline.io/gateway-controller}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: public, namespace: edge}}
spec:
  gatewayClassName: meshline
  listeners:
  - {{name: https, port: {self.https}, protocol: HTTPS, hostname: web.example.com,
     tls: {{mode: Terminate, certificateRefs: [{{name: public-cert}}]}}, allowedRoutes: {{namespaces: {{from: All}}}}}}
  - {{name: http, port: {self.http}, protocol: HTTP, allowedRoutes: {{namespaces: {{from: All}}}}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: web, namespace: shop}}
spec:
  parentRefs: [{{name: public, namespace: edge}}]
  hostnames: [web.example.com]
  rules:
  - filters:
    - {{type: RequestHeaderModifier, requestHeaderModifier: {{set: [{{name: x-via, value: gateway-api}}]}}}}
    backendRefs: [{{name: web-a, port: {PORT}, weight: 80}}, {{name: web-b, port: {PORT}, weight: 20}}]
"""]
        (self.mesh / "mesh.yaml").write_text("---\n".join(docs))

    def start(self) -> None:
        start_backends(self.procs, *(f"{n}={ip}:{PORT}" for n, ip in BACKENDS.items()))
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "controlplane.cli", "serve", "--config-dir", str(self.mesh),
             "--ca-dir", str(self.ca_dir), "--xds-address", f"127.0.0.1:{self.xds}",
             "--status-address", f"127.0.0.1:{self.status}"],
            cwd=ROOT, stdout=open(self.tmp / "serve.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True))
        wait_http(f"http://127.0.0.1:{self.status}/readyz", proc=self.procs[-1], timeout=30)
        boot = subprocess.run(
            [sys.executable, "-m", "controlplane.cli", "bootstrap", "--node-id", "public-1",
             "--xds-address", f"127.0.0.1:{self.xds}", "--mode", "gateway", "--gateway", "public",
             "--namespace", "edge", "--workload", "public-1", "--service-account", "public",
             "--labels", "gateway.networking.k8s.io/gateway-name=public", "--ca-dir", str(self.ca_dir),
             "--token-out", str(self.tmp / "public.token")],
            cwd=ROOT, check=True, capture_output=True, text=True).stdout
        doc = yaml.safe_load(boot)
        admin = free_port()
        doc["admin"]["address"]["socket_address"]["port_value"] = admin
        doc["static_resources"].pop("listeners", None)
        self.procs.append(start_envoy(yaml.safe_dump(doc), self.tmp, "gateway", log_level="info"))
        wait_http(f"http://127.0.0.1:{admin}/ready", ok=(200, 503), proc=self.procs[-1])

    def curl(self, host: str, port: int) -> tuple[int, str]:
        cmd = ["curl", "-sS", "--max-time", "5", "--resolve", f"{host}:{port}:127.0.0.1", "--cacert",
               str(self.tmp / "ca.pem"), "-o", "-", "-w", "\n%{http_code}", f"https://{host}:{port}/"]
        out = subprocess.run(cmd, capture_output=True, text=True)
        return out.returncode, out.stdout + out.stderr

    def status_api(self, path: str) -> Any:
        return httpx.get(f"http://127.0.0.1:{self.status}{path}", timeout=5).json()

    def close(self) -> None:
        for p in reversed(self.procs):
            stop(p)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    yield from started(Env(tmp_path_factory.mktemp("gwapi")))


def test_https_listener_serves_the_certificate_ref_and_the_attached_route(env: Env) -> None:
    def ok() -> str | None:
        code, out = env.curl("web.example.com", env.https)
        return out if code == 0 and status_of(out) == 200 else None

    body = body_of(eventually(ok))
    assert body["backend"] in BACKENDS and body["headers"].get("x-via") == "gateway-api"


def test_http_listener_splits_80_20(env: Env) -> None:
    url = f"http://127.0.0.1:{env.http}/"
    with httpx.Client(timeout=5) as client:
        eventually(lambda: client.get(url, headers={"host": "web.example.com"}).status_code == 200)
        n = 200
        counts = Counter(client.get(url, headers={"host": "web.example.com"}).json()["backend"] for _ in range(n))
        assert set(counts) == set(BACKENDS), counts
        assert abs(counts["web-a"] - 0.8 * n) <= 30, counts  # std-dev ~5.7: > 5 sigma
        assert client.get(url, headers={"host": "other.example.com"}).status_code == 404  # no route for it


def test_gateway_and_route_status(env: Env) -> None:
    (route,) = [r for r in env.status_api("/v1/routes") if r["name"] == "web"]
    (parent,) = route["parents"]
    assert parent["controllerName"] == "meshline.io/gateway-controller"
    assert {c["type"]: c["status"] for c in parent["conditions"]} == {"Accepted": "True", "ResolvedRefs": "True"}
    gws = {(g["kind"], g["name"]): g["status"] for g in env.status_api("/v1/gateways")}
    gw = gws[("Gateway", "public")]
    assert {c["type"]: c["status"] for c in gw["conditions"]} == {"Accepted": "True", "Programmed": "True"}
    assert {ls["name"]: ls["attachedRoutes"] for ls in gw["listeners"]} == {"https": 1, "http": 1}
    assert gws[("GatewayClass", "meshline")]["conditions"][0]["status"] == "True"
