"""Gateway API Gateway TLS end to end (issue 18, h24): `meshline serve --ca-dir` on a directory,
a real Envoy started with `meshline bootstrap --mode gateway --gateway public` (its pod labelled
`gateway.networking.k8s.io/gateway-name: public`, authenticated by a bootstrap token), curl with
`--resolve` as the outside client.

- HTTPS listeners (TLS Terminate) whose certificateRefs name a Secret of the Gateway's
  namespace, of another namespace a ReferenceGrant allows, and of one no grant allows: the
  first two serve their own certificate (curl verifies it for the listener's hostname against
  the test CA; Envoy's config_dump shows the Secret's subject); the third is not served at
  all (nothing listens, no key sent), until a ReferenceGrant is added, and is withdrawn again
  when the grant is deleted (fail closed).
- A TLS listener in mode Passthrough with a TLSRoute: the backend (a Python TLS server)
  terminates TLS, so the client sees the backend's certificate (it verifies against the
  backend's CA, and not against the gateway's); an SNI no TLSRoute names is refused.
- Status (`GET /v1/gateways`, `/v1/routes`): ResolvedRefs=False/RefNotPermitted on the refused
  listener; the TLSRoute Accepted on the TLS listener.
"""

from __future__ import annotations

import http.server
import json
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from controlplane.localrun import free_port, start_envoy, stop, wait_http, wait_port
from tests.e2e.conftest import start_backends, started, write_config
from tests.e2e.test_gateway_e2e import (
    body_of,
    eventually,
    issue,
    make_ca,
    secret_names,
    secret_yaml,
    status_of,
    subjects,
)
from tests.meshgen import Backend, service_yaml

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]
WEB = "127.0.0.171"
VAULT = "127.0.0.172"
PORT = 19171
TLS_PORT = 19172
GRANT = """apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: edge-gateways, namespace: vault}
spec:
  from: [{group: gateway.networking.k8s.io, kind: Gateway, namespace: edge}]
  to: [{group: "", kind: Secret, name: vault-cert}]
"""


def active_listeners(admin: int) -> set[str]:
    """The listeners Envoy serves (`active_state`; a removed one stays in config_dump while it
    drains its connections, with `draining_state` only)."""
    d = httpx.get(f"http://127.0.0.1:{admin}/config_dump", timeout=5).json()
    out: set[str] = set()
    for cfg in d["configs"]:
        if "ListenersConfigDump" in cfg["@type"]:
            out.update(x["name"] for x in cfg.get("dynamic_listeners", []) if "active_state" in x)
    return out


class TlsBackend:
    """An HTTPS server on VAULT:TLS_PORT with its own certificate (pg.db.example.com)."""

    def __init__(self, cert: Path, key: Path) -> None:
        class Hello(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = json.dumps({"backend": "vault-tls"}).encode()
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                return

        self.server = http.server.ThreadingHTTPServer((VAULT, TLS_PORT), Hello)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, key)
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Env:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.mesh = tmp / "mesh"
        self.mesh.mkdir()
        self.ca_dir = tmp / "ca"
        self.xds, self.status, self.admin = free_port(), free_port(), free_port()
        self.same, self.granted, self.refused, self.passthrough = free_port(), free_port(), free_port(), free_port()
        self.procs: list[subprocess.Popen[bytes]] = []
        self.backend: TlsBackend | None = None
        ca = make_ca("gwapi-tls-test-ca")
        (tmp / "ca.pem").write_text(ca[0].cert)
        backend_ca = make_ca("vault-backend-ca")
        (tmp / "backend-ca.pem").write_text(backend_ca[0].cert)
        leaf = issue(backend_ca, "pg.db.example.com", client=False)
        (tmp / "vault.pem").write_text(leaf.cert + backend_ca[0].cert)
        (tmp / "vault-key.pem").write_text(leaf.key)
        docs = [
            *(f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n" for ns in ("shop", "edge", "certs", "vault")),
            service_yaml("web", "shop", PORT, [Backend(WEB)]),
            service_yaml("vault", "shop", TLS_PORT, [Backend(VAULT)], port_name="tls"),
            secret_yaml("public-cert", "edge", issue(ca, "web.example.com", client=False)),
            secret_yaml("partner-cert", "certs", issue(ca, "partner.example.com", client=False)),
            secret_yaml("vault-cert", "vault", issue(ca, "vault.example.com", client=False)),
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
  - {{name: same, port: {self.same}, protocol: HTTPS, hostname: web.example.com,
     tls: {{certificateRefs: [{{name: public-cert}}]}}, allowedRoutes: {{namespaces: {{from: All}}}}}}
  - {{name: granted, port: {self.granted}, protocol: HTTPS, hostname: partner.example.com,
     tls: {{certificateRefs: [{{name: partner-cert, namespace: certs}}]}}, allowedRoutes: {{namespaces: {{from: All}}}}}}
  - {{name: refused, port: {self.refused}, protocol: HTTPS, hostname: vault.example.com,
     tls: {{certificateRefs: [{{name: vault-cert, namespace: vault}}]}}, allowedRoutes: {{namespaces: {{from: All}}}}}}
  - {{name: tls, port: {self.passthrough}, protocol: TLS, hostname: "*.db.example.com",
     tls: {{mode: Passthrough}}, allowedRoutes: {{namespaces: {{from: All}}}}}}
---
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {{name: edge-gateways, namespace: certs}}
spec:
  from: [{{group: gateway.networking.k8s.io, kind: Gateway, namespace: edge}}]
  to: [{{group: "", kind: Secret, name: partner-cert}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: web, namespace: shop}}
spec:
  parentRefs: [{{name: public, namespace: edge}}]
  hostnames: [web.example.com, partner.example.com, vault.example.com]
  rules:
  - backendRefs: [{{name: web, port: {PORT}}}]
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TLSRoute
metadata: {{name: pg, namespace: shop}}
spec:
  parentRefs: [{{name: public, namespace: edge, sectionName: tls}}]
  hostnames: [pg.db.example.com]
  rules:
  - backendRefs: [{{name: vault, port: {TLS_PORT}}}]
"""]
        (self.mesh / "mesh.yaml").write_text("---\n".join(docs))

    def start(self) -> None:
        self.backend = TlsBackend(self.tmp / "vault.pem", self.tmp / "vault-key.pem")
        start_backends(self.procs, f"web={WEB}:{PORT}")
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
        doc["admin"]["address"]["socket_address"]["port_value"] = self.admin
        doc["static_resources"].pop("listeners", None)
        self.procs.append(start_envoy(yaml.safe_dump(doc), self.tmp, "gateway", log_level="info"))
        wait_http(f"http://127.0.0.1:{self.admin}/ready", ok=(200, 503), proc=self.procs[-1])

    def curl(self, host: str, port: int, ca: str = "ca.pem") -> tuple[int, str]:
        cmd = ["curl", "-sS", "--max-time", "5", "--resolve", f"{host}:{port}:127.0.0.1", "--cacert",
               str(self.tmp / ca), "-o", "-", "-w", "\n%{http_code}", f"https://{host}:{port}/"]
        out = subprocess.run(cmd, capture_output=True, text=True)
        return out.returncode, out.stdout + out.stderr

    def ok(self, host: str, port: int, ca: str = "ca.pem") -> dict[str, Any]:
        def check() -> str | None:
            code, out = self.curl(host, port, ca)
            return out if code == 0 and status_of(out) == 200 else None

        return body_of(eventually(check))

    def status_api(self, path: str) -> Any:
        return httpx.get(f"http://127.0.0.1:{self.status}{path}", timeout=5).json()

    def listener_status(self, name: str) -> dict[str, tuple[str, str]]:
        gws = {(g["kind"], g["name"]): g["status"] for g in self.status_api("/v1/gateways")}
        (ls,) = [ls for ls in gws[("Gateway", "public")]["listeners"] if ls["name"] == name]
        return {c["type"]: (c["status"], c["reason"]) for c in ls["conditions"]}

    def close(self) -> None:
        for p in reversed(self.procs):
            stop(p)
        if self.backend is not None:
            self.backend.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    yield from started(Env(tmp_path_factory.mktemp("gwapi-tls")))


def test_certificate_ref_of_the_gateways_namespace(env: Env) -> None:
    assert env.ok("web.example.com", env.same)["backend"] == "web"
    assert eventually(lambda: subjects(env.admin)).get("kubernetes-gateway://edge/public-cert") == \
        "CN=web.example.com"


def test_certificate_ref_of_another_namespace_with_a_reference_grant(env: Env) -> None:
    assert env.ok("partner.example.com", env.granted)["backend"] == "web"
    assert subjects(env.admin)["kubernetes-gateway://certs/partner-cert"] == "CN=partner.example.com"
    assert env.listener_status("granted")["ResolvedRefs"] == ("True", "ResolvedRefs")


def test_certificate_ref_without_a_reference_grant_serves_nothing_until_one_exists(env: Env) -> None:
    env.ok("web.example.com", env.same)  # the gateway is up and configured
    code, out = env.curl("vault.example.com", env.refused)
    assert code == 7, out  # connection refused: no listener on that port, not even a TLS handshake
    assert f"0.0.0.0_{env.refused}" not in active_listeners(env.admin)
    assert not any("vault" in n for n in secret_names(env.admin))  # the key was never sent
    assert env.listener_status("refused") == {"Accepted": ("True", "Accepted"), "Programmed": ("False", "Invalid"),
                                              "ResolvedRefs": ("False", "RefNotPermitted")}
    # A ReferenceGrant in the Secret's namespace: the listener is served with that Secret.
    write_config(env.mesh, "grant.yaml", GRANT)
    assert env.ok("vault.example.com", env.refused)["backend"] == "web"
    assert f"0.0.0.0_{env.refused}" in active_listeners(env.admin)
    assert subjects(env.admin)["kubernetes-gateway://vault/vault-cert"] == "CN=vault.example.com"
    assert env.listener_status("refused")["ResolvedRefs"] == ("True", "ResolvedRefs")
    # The grant deleted: the listener is withdrawn again (fail closed).
    (env.mesh / "grant.yaml").unlink()
    eventually(lambda: f"0.0.0.0_{env.refused}" not in active_listeners(env.admin))
    eventually(lambda: env.curl("vault.example.com", env.refused)[0] == 7)
    # nor is its key kept: the draining listener's secret is overwritten by a stand-in
    eventually(lambda: subjects(env.admin).get("kubernetes-gateway://vault/vault-cert", "") != "CN=vault.example.com")
    assert env.listener_status("refused")["ResolvedRefs"] == ("False", "RefNotPermitted")


def test_tls_passthrough_client_sees_the_backends_own_certificate(env: Env) -> None:
    wait_port("127.0.0.1", env.passthrough)
    assert env.ok("pg.db.example.com", env.passthrough, ca="backend-ca.pem") == {"backend": "vault-tls"}
    code, out = env.curl("pg.db.example.com", env.passthrough, ca="ca.pem")
    assert code == 60, out  # the gateway's CA does not verify it: the certificate is the backend's
    code, out = env.curl("other.db.example.com", env.passthrough, ca="backend-ca.pem")
    assert code != 0 and not out.rstrip().endswith("200"), out  # no TLSRoute for that SNI: refused
    (route,) = [r for r in env.status_api("/v1/routes") if r["name"] == "pg"]
    (parent,) = route["parents"]
    assert {c["type"]: c["status"] for c in parent["conditions"]} == {"Accepted": "True", "ResolvedRefs": "True"}
    gw = {(g["kind"], g["name"]): g["status"] for g in env.status_api("/v1/gateways")}[("Gateway", "public")]
    assert {ls["name"]: ls["attachedRoutes"] for ls in gw["listeners"]}["tls"] == 1
