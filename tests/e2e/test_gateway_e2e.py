"""An ingress gateway end to end (issue 18): `meshline serve --ca-dir` on a directory, a real
Envoy started with `meshline bootstrap --mode gateway`, a plain HTTP backend and a real
sidecar Envoy, curl as the outside client.

- HTTPS SIMPLE: curl verifies the gateway's certificate (from the `credentialName` Secret in
  the directory, delivered over SDS) against the test CA and reaches the backend; a client
  trusting another CA refuses the gateway.
- HTTPS MUTUAL: without a client certificate the handshake fails; with one the CA of the
  Secret signed, the request reaches the backend; one from another CA is refused.
- Binding: a VirtualService bound only to the gateway is not applied by the sidecar, and one
  bound only to `mesh` (a fault answering 418) is not applied by the gateway.
- Trust: a gateway proxy without an identity gets the listeners but never the private key.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from controlplane.localrun import free_port, start_envoy, stop, wait_http, wait_port
from tests.e2e.conftest import start_backends
from tests.meshgen import Backend, service_yaml

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]
BACKEND = "127.0.0.131"
BACKEND_PORT = 19131


@dataclass(frozen=True)
class Pem:
    cert: str
    key: str


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def make_ca(name: str) -> tuple[Pem, ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return Pem(cert.public_bytes(serialization.Encoding.PEM).decode(), _key_pem(key)), key, cert


def issue(ca: tuple[Pem, ec.EllipticCurvePrivateKey, x509.Certificate], name: str, *, client: bool) -> Pem:
    _, ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return Pem(cert.public_bytes(serialization.Encoding.PEM).decode(), _key_pem(key))


def secret_yaml(name: str, ns: str, pem: Pem, ca: str = "") -> str:
    data = {"tls.crt": pem.cert, "tls.key": pem.key, **({"ca.crt": ca} if ca else {})}
    return yaml.safe_dump({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                           "metadata": {"name": name, "namespace": ns}, "stringData": data})


class Env:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.mesh = tmp / "mesh"
        self.mesh.mkdir()
        self.ca_dir = tmp / "ca"
        self.xds, self.status = free_port(), free_port()
        self.https, self.mtls, self.http = free_port(), free_port(), free_port()
        self.procs: list[subprocess.Popen[bytes]] = []
        self.admin = 0
        server_ca = make_ca("gateway-test-ca")
        client_ca = make_ca("client-test-ca")
        rogue_ca = make_ca("rogue-ca")
        self.server_ca = server_ca[0].cert
        self.rogue_ca = rogue_ca[0].cert
        files = {"server-ca.pem": self.server_ca, "rogue-ca.pem": self.rogue_ca}
        for label, pem in (("client", issue(client_ca, "client.example.com", client=True)),
                           ("rogue-client", issue(rogue_ca, "client.example.com", client=True))):
            files[f"{label}.pem"], files[f"{label}-key.pem"] = pem.cert, pem.key
        for name, text in files.items():
            (tmp / name).write_text(text)
        web = issue(server_ca, "web.example.com", client=False)
        secure = issue(server_ca, "secure.example.com", client=False)
        self.write("00-ns.yaml", "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\n"
                                 "apiVersion: v1\nkind: Namespace\nmetadata: {name: ingress}\n")
        self.write("10-web.yaml", service_yaml("web", "shop", BACKEND_PORT, [Backend(BACKEND)]))
        self.write("20-secrets.yaml", secret_yaml("web-cert", "ingress", web) + "---\n"
                   + secret_yaml("secure-cert", "ingress", secure, ca=client_ca[0].cert))
        self.write("30-gateway.yaml", f"""
apiVersion: v1
kind: Pod
metadata: {{name: ingressgateway-1, namespace: ingress, labels: {{istio: ingressgateway}}}}
spec: {{serviceAccountName: ingressgateway, containers: [{{name: envoy, image: x}}]}}
status: {{podIP: 127.0.0.1}}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: edge, namespace: ingress}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: {self.https}, name: https, protocol: HTTPS}}
    bind: 127.0.0.1
    hosts: [web.example.com]
    tls: {{mode: SIMPLE, credentialName: web-cert}}
  - port: {{number: {self.mtls}, name: https-mtls, protocol: HTTPS}}
    bind: 127.0.0.1
    hosts: [secure.example.com]
    tls: {{mode: MUTUAL, credentialName: secure-cert}}
  - port: {{number: {self.http}, name: http, protocol: HTTP}}
    bind: 127.0.0.1
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: edge-web, namespace: ingress}}
spec:
  hosts: [web.example.com, secure.example.com, web.shop.svc.cluster.local]
  gateways: [edge]
  http:
  - route: [{{destination: {{host: web.shop.svc.cluster.local, port: {{number: {BACKEND_PORT}}}}}}}]
    headers: {{request: {{set: {{x-via: edge}}}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: web-mesh, namespace: shop}}
spec:
  hosts: [web]
  http:
  - route: [{{destination: {{host: web}}}}]
    fault: {{abort: {{httpStatus: 418, percentage: {{value: 100}}}}}}
""")

    def write(self, name: str, text: str) -> None:
        (self.mesh / name).write_text(text)

    def start(self, backend: str = f"web={BACKEND}:{BACKEND_PORT}") -> None:
        start_backends(self.procs, backend)
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "controlplane.cli", "serve", "--config-dir", str(self.mesh),
             "--ca-dir", str(self.ca_dir), "--xds-address", f"127.0.0.1:{self.xds}",
             "--status-address", f"127.0.0.1:{self.status}"],
            cwd=ROOT, stdout=open(self.tmp / "serve.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True))
        wait_http(f"http://127.0.0.1:{self.status}/readyz", proc=self.procs[-1], timeout=30)

    def envoy(self, name: str, *args: str) -> int:
        boot = subprocess.run([sys.executable, "-m", "controlplane.cli", "bootstrap", "--node-id", name,
                               "--xds-address", f"127.0.0.1:{self.xds}", *args],
                              cwd=ROOT, check=True, capture_output=True, text=True).stdout
        doc = yaml.safe_load(boot)
        admin = free_port()
        doc["admin"]["address"]["socket_address"]["port_value"] = admin
        doc["static_resources"].pop("listeners", None)  # 15021/15090: one per host, not per test
        self.procs.append(start_envoy(yaml.safe_dump(doc), self.tmp, name, log_level="info"))
        wait_http(f"http://127.0.0.1:{admin}/ready", ok=(200, 503), proc=self.procs[-1])
        return admin

    def gateway(self, name: str, *, identity: bool) -> int:
        args = ["--mode", "gateway", "--gateway", "edge", "--namespace", "ingress", "--workload", "ingressgateway-1",
                "--service-account", "ingressgateway", "--labels", "istio=ingressgateway"]
        if identity:
            args += ["--ca-dir", str(self.ca_dir), "--token-out", str(self.tmp / f"{name}.token")]
        return self.envoy(name, *args)

    def curl(self, host: str, port: int, *, scheme: str = "https", ca: str = "server-ca.pem",
             cert: str | None = None) -> tuple[int, str]:
        """(curl exit code, body) for GET <scheme>://<host>:<port>/ resolved to 127.0.0.1."""
        cmd = ["curl", "-sS", "--max-time", "5", "--resolve", f"{host}:{port}:127.0.0.1",
               "-o", "-", "-w", "\n%{http_code}", f"{scheme}://{host}:{port}/"]
        if scheme == "https":
            cmd += ["--cacert", str(self.tmp / ca)]
        if cert:
            cmd += ["--cert", str(self.tmp / f"{cert}.pem"), "--key", str(self.tmp / f"{cert}-key.pem")]
        out = subprocess.run(cmd, capture_output=True, text=True)
        return out.returncode, out.stdout + out.stderr

    def close(self) -> None:
        for p in reversed(self.procs):
            stop(p)


def status_of(text: str) -> int:
    return int(text.strip().rsplit("\n", 1)[-1])


def body_of(text: str) -> dict[str, Any]:
    return dict(json.loads(text.strip().rsplit("\n", 1)[0]))


def eventually(check: Any, timeout: float = 40.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"not reached in {timeout}s: {last!r}")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    e = Env(tmp_path_factory.mktemp("gateway"))
    try:
        e.start()
        e.admin = e.gateway("ingressgateway", identity=True)
        yield e
    finally:
        e.close()


def test_https_simple_serves_the_credential_and_reaches_the_backend(env: Env) -> None:
    def ok() -> str | None:
        code, out = env.curl("web.example.com", env.https)
        return out if code == 0 and status_of(out) == 200 else None

    out = eventually(ok)
    body = body_of(out)
    assert body["backend"] == "web"
    assert body["headers"].get("x-via") == "edge"  # the gateway's VirtualService, not the mesh's 418
    # A client that trusts another CA refuses the gateway's certificate.
    code, out = env.curl("web.example.com", env.https, ca="rogue-ca.pem")
    assert code == 60, out  # curl: peer certificate cannot be authenticated


def test_https_mutual_requires_a_client_certificate_from_the_secrets_ca(env: Env) -> None:
    def ok() -> str | None:
        code, out = env.curl("secure.example.com", env.mtls, cert="client")
        return out if code == 0 and status_of(out) == 200 else None

    assert body_of(eventually(ok))["backend"] == "web"
    code, out = env.curl("secure.example.com", env.mtls)
    assert code != 0 or status_of(out) == 0, out  # no client certificate: the handshake fails
    code, out = env.curl("secure.example.com", env.mtls, cert="rogue-client")
    assert code != 0 or status_of(out) == 0, out


def test_gateway_and_sidecar_apply_only_what_is_bound_to_them(env: Env) -> None:
    outbound = "127.0.0.132"
    admin = env.envoy("client", "--namespace", "shop", "--workload", "client", "--labels", "app=client",
                      "--outbound-address", outbound)
    wait_http(f"http://127.0.0.1:{admin}/ready", proc=env.procs[-1])
    wait_port(outbound, BACKEND_PORT)
    with httpx.Client(timeout=5) as c:
        # The sidecar applies the mesh VirtualService (418) ...
        eventually(lambda: c.get(f"http://{outbound}:{BACKEND_PORT}/",
                                 headers={"host": "web.shop.svc.cluster.local"}).status_code == 418)
        # ... and not the gateway's: no virtual host for web.example.com (404), no x-via.
        r = c.get(f"http://{outbound}:{BACKEND_PORT}/", headers={"host": "web.example.com"})
        assert r.status_code == 404
        # The gateway applies its own and not the mesh one: the same service host answers 200.
        r = eventually(lambda: (resp := c.get(f"http://127.0.0.1:{env.http}/",
                                              headers={"host": "web.shop.svc.cluster.local"})).status_code == 200
                       and resp)
        assert r.json()["headers"].get("x-via") == "edge"
        # A host no bound VirtualService names: Envoy's 404 at the gateway.
        assert c.get(f"http://127.0.0.1:{env.http}/", headers={"host": "nobody.example.com"}).status_code == 404


def secret_names(admin: int, state: str = "dynamic_active_secrets") -> set[str]:
    """The names of the secrets Envoy holds (`dynamic_warming_secrets`: asked for, not received)."""
    d = httpx.get(f"http://127.0.0.1:{admin}/config_dump", timeout=5).json()
    out: set[str] = set()
    for cfg in d["configs"]:
        if "SecretsConfigDump" in cfg["@type"]:
            out.update(s["name"] for s in cfg.get(state, []))
    return out


def listener_names(admin: int) -> set[str]:
    d = httpx.get(f"http://127.0.0.1:{admin}/config_dump", timeout=5).json()
    out: set[str] = set()
    for cfg in d["configs"]:
        if "ListenersConfigDump" in cfg["@type"]:
            out.update(x["name"] for x in cfg.get("dynamic_listeners", []))
    return out


def test_a_gateway_without_identity_never_gets_the_key(env: Env) -> None:
    # The gateway with an identity holds both credentials (control) ...
    assert {"kubernetes://web-cert", "kubernetes://secure-cert"} <= eventually(lambda: secret_names(env.admin))
    # ... one with the same Gateway, pod and labels but no token gets the listeners, no key.
    admin = env.gateway("anonymous-gateway", identity=False)
    try:
        eventually(lambda: f"127.0.0.1_{env.https}" in listener_names(admin))
        # It asks for the credentials (its listeners name them) and is sent none: the TLS
        # servers never become ready on it (fail closed), nothing falls back to plaintext.
        eventually(lambda: "kubernetes://web-cert" in secret_names(admin, "dynamic_warming_secrets"))
        time.sleep(1.0)
        assert not any(n.startswith("kubernetes://") for n in secret_names(admin))
        assert secret_names(admin) == set()  # not even its (nonexistent) workload certificate
    finally:
        stop(env.procs.pop())


def subjects(admin: int) -> dict[str, str]:
    """Secret name -> subject of the certificate Envoy holds under it (its config_dump)."""
    d = httpx.get(f"http://127.0.0.1:{admin}/config_dump", timeout=5).json()
    out = {}
    for cfg in d["configs"]:
        for sec in cfg.get("dynamic_active_secrets", []):
            chain = sec["secret"].get("tls_certificate", {}).get("certificate_chain", {})
            if "inline_bytes" in chain:
                cert = x509.load_pem_x509_certificate(base64.b64decode(chain["inline_bytes"]))
                out[sec["name"]] = cert.subject.rfc4514_string()
    return out


def test_an_authenticated_proxy_the_gateway_does_not_select_gets_stand_ins(env: Env) -> None:
    """A token for the right namespace and service account, but claiming a pod the Gateway's
    selector does not pick: the credential names are filled with certificates that prove
    nothing (fail closed), never the Secret's."""
    env.write("31-impostor.yaml", "apiVersion: v1\nkind: Pod\nmetadata: {name: impostor, namespace: ingress, "
                                  "labels: {app: other}}\nspec: {serviceAccountName: ingressgateway, containers: "
                                  "[{name: envoy, image: x}]}\nstatus: {podIP: 127.0.0.1}\n")
    args = ["--mode", "gateway", "--gateway", "edge", "--namespace", "ingress", "--workload", "impostor",
            "--service-account", "ingressgateway", "--labels", "istio=ingressgateway",
            "--ca-dir", str(env.ca_dir), "--token-out", str(env.tmp / "impostor.token")]
    admin = env.envoy("impostor-gateway", *args)
    try:
        got = eventually(lambda: (g := subjects(admin)) and {"kubernetes://web-cert", "kubernetes://secure-cert"}
                         <= set(g) and g)
        assert got["kubernetes://web-cert"] == got["kubernetes://secure-cert"] == "CN=meshline-no-credential"
        assert subjects(env.admin)["kubernetes://web-cert"] == "CN=web.example.com"  # control: the real gateway
    finally:
        stop(env.procs.pop())
        (env.mesh / "31-impostor.yaml").unlink()


# --------------------------------------------------------------------------- egress

EXTERNAL, EXTERNAL_PORT = "127.0.0.135", 19135
EGRESS, EGRESS_PORT = "127.0.0.136", 19136
CLIENT_OUT = "127.0.0.137"

EGRESS_MESH = f"""
apiVersion: v1
kind: Namespace
metadata: {{name: edge}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: shop}}
---
# The external service, known to the mesh through a ServiceEntry (a loopback stand-in).
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: ext, namespace: edge}}
spec:
  hosts: [ext.example.com]
  location: MESH_EXTERNAL
  ports: [{{number: {EXTERNAL_PORT}, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: {EXTERNAL}}}]
---
# The egress gateway: its Pod, its Service (how sidecars reach it) and its Gateway.
apiVersion: v1
kind: Pod
metadata: {{name: egressgateway-1, namespace: edge, labels: {{istio: egressgateway}}}}
spec: {{serviceAccountName: egressgateway, containers: [{{name: envoy, image: x}}]}}
status: {{podIP: {EGRESS}}}
---
apiVersion: v1
kind: Service
metadata: {{name: egressgateway, namespace: edge}}
spec:
  selector: {{istio: egressgateway}}
  ports: [{{name: http, port: {EGRESS_PORT}}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: egressgateway-1, namespace: edge, labels: {{kubernetes.io/service-name: egressgateway}}}}
addressType: IPv4
ports: [{{name: http, port: {EGRESS_PORT}, protocol: TCP}}]
endpoints:
- {{addresses: [{EGRESS}], conditions: {{ready: true}}, targetRef: {{kind: Pod, name: egressgateway-1}}}}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: egress, namespace: edge}}
spec:
  selector: {{istio: egressgateway}}
  servers:
  - port: {{number: {EGRESS_PORT}, name: http, protocol: HTTP}}
    bind: {EGRESS}
    hosts: [ext.example.com]
---
# Istio's egress pattern: sidecars send ext.example.com to the egress gateway, which sends
# it out (adding a header that proves the path).
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: ext-via-egress, namespace: edge}}
spec:
  hosts: [ext.example.com]
  gateways: [mesh, egress]
  http:
  - match: [{{gateways: [mesh], port: {EXTERNAL_PORT}}}]
    route: [{{destination: {{host: egressgateway.edge.svc.cluster.local, port: {{number: {EGRESS_PORT}}}}}}}]
  - match: [{{gateways: [egress], port: {EGRESS_PORT}}}]
    route: [{{destination: {{host: ext.example.com, port: {{number: {EXTERNAL_PORT}}}}}}}]
    headers: {{request: {{set: {{x-egress: edge/egress}}}}}}
"""


@pytest.fixture(scope="module")
def egress(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    e = Env(tmp_path_factory.mktemp("egress"))
    for f in e.mesh.iterdir():
        f.unlink()
    e.write("00-egress.yaml", EGRESS_MESH)
    try:
        e.start(backend=f"external={EXTERNAL}:{EXTERNAL_PORT}")
        yield e
    finally:
        e.close()


def test_egress_gateway_carries_a_service_entry_host(egress: Env) -> None:
    """A sidecar's request for the ServiceEntry host leaves through the egress gateway (the
    mesh-bound route sends it there, the gateway-bound route sends it out), as in Istio's
    egress gateway task; the gateway's own stats count it."""
    gw_admin = egress.envoy("egressgateway", "--mode", "gateway", "--gateway", "egress", "--namespace", "edge",
                            "--workload", "egressgateway-1", "--service-account", "egressgateway")
    egress.envoy("client", "--namespace", "shop", "--workload", "client", "--outbound-address", CLIENT_OUT)
    wait_port(CLIENT_OUT, EXTERNAL_PORT)
    wait_port(EGRESS, EGRESS_PORT)
    with httpx.Client(timeout=5) as c:
        def through() -> httpx.Response | None:
            r = c.get(f"http://{CLIENT_OUT}:{EXTERNAL_PORT}/out", headers={"host": "ext.example.com"})
            return r if r.status_code == 200 else None

        r = eventually(through)
        assert r.json()["backend"] == "external"
        assert r.json()["headers"].get("x-egress") == "edge/egress"  # set only by the gateway-bound route
        stats = c.get(f"http://127.0.0.1:{gw_admin}/stats?filter=downstream_rq_2xx").text
        assert any(line.endswith(tuple(f": {n}" for n in range(1, 100))) for line in stats.splitlines()
                   if f"{EGRESS}_{EGRESS_PORT}" in line), stats


# --------------------------------------------------------------------------- TLS passthrough

TLS_BACKEND, TLS_BACKEND_PORT = "127.0.0.138", 19138


def test_tls_passthrough_reaches_the_backend_that_terminates_tls(tmp_path: Path) -> None:
    """A PASSTHROUGH server routes by SNI with the bound VirtualService's tls route: the
    backend (a Python TLS server on loopback) terminates TLS, so curl verifies the backend's
    certificate, not one of the gateway's; an SNI no tls route names is refused."""
    import http.server
    import ssl
    import threading

    e = Env(tmp_path)
    for f in e.mesh.iterdir():
        f.unlink()
    ca = make_ca("passthrough-ca")
    (tmp_path / "pt-ca.pem").write_text(ca[0].cert)
    leaf = issue(ca, "db.example.com", client=False)
    (tmp_path / "db.pem").write_text(leaf.cert + ca[0].cert)
    (tmp_path / "db-key.pem").write_text(leaf.key)

    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"hello from the tls backend\n"
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            return

    server = http.server.ThreadingHTTPServer((TLS_BACKEND, TLS_BACKEND_PORT), Hello)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tmp_path / "db.pem", tmp_path / "db-key.pem")
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = free_port()
    e.write("00-pt.yaml", f"""
apiVersion: v1
kind: Namespace
metadata: {{name: edge}}
---
apiVersion: v1
kind: Service
metadata: {{name: db, namespace: edge}}
spec: {{selector: {{app: db}}, ports: [{{name: tls, port: {TLS_BACKEND_PORT}}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: db-1, namespace: edge, labels: {{kubernetes.io/service-name: db}}}}
addressType: IPv4
ports: [{{name: tls, port: {TLS_BACKEND_PORT}, protocol: TCP}}]
endpoints: [{{addresses: [{TLS_BACKEND}], conditions: {{ready: true}}}}]
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: pt, namespace: edge}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: {port}, name: tls, protocol: TLS}}
    bind: 127.0.0.1
    hosts: ["*.example.com"]
    tls: {{mode: PASSTHROUGH}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: db-sni, namespace: edge}}
spec:
  hosts: ["*.example.com"]
  gateways: [pt]
  tls:
  - match: [{{sniHosts: [db.example.com]}}]
    route: [{{destination: {{host: db.edge.svc.cluster.local, port: {{number: {TLS_BACKEND_PORT}}}}}}}]
""")
    try:
        e.start(backend="unused=127.0.0.139:19139")
        e.envoy("pt-gateway", "--mode", "gateway", "--gateway", "pt", "--namespace", "edge")
        wait_port("127.0.0.1", port)

        def ok() -> str | None:
            code, out = e.curl("db.example.com", port, ca="pt-ca.pem")
            return out if code == 0 and status_of(out) == 200 else None

        assert "hello from the tls backend" in eventually(ok)
        code, out = e.curl("other.example.com", port, ca="pt-ca.pem")  # no tls route: no chain, refused
        assert code != 0, out
    finally:
        server.shutdown()
        e.close()
