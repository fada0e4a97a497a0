"""TLS origination to a MESH_EXTERNAL ServiceEntry host (issue 18), real Envoy sidecar (bind
capture) and a real TLS backend: the app speaks plain HTTP to its sidecar, the sidecar
originates TLS as the DestinationRule says (SIMPLE, the host's CA and SNI), and the HTTPS
backend on loopback answers. Without the DestinationRule the sidecar speaks plain HTTP to
the TLS port and the request fails; with a CA that did not sign the backend's certificate,
it fails too (verification is real). Certificates are made here with `cryptography`."""

from __future__ import annotations

import datetime
import http.server
import json
import ssl
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from controlplane.localrun import free_port, stop, wait_port
from tests.e2e.conftest import eventually, start_client_sidecar, started, write_config

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
OUTBOUND = "127.0.6.2"
BACKEND = "127.0.6.21"
HOST = "secure.external.example"


def _ca(name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return cert, key


def _server_cert(ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(HOST)]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        return

    def do_GET(self) -> None:
        data = json.dumps({"backend": "tls"}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class Env:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.config = work / "config"
        self.config.mkdir()
        ca, ca_key = _ca("external-ca")
        other, _ = _ca("some-other-ca")
        self.ca_file = work / "ca.pem"
        self.ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        self.other_ca_file = work / "other-ca.pem"
        self.other_ca_file.write_bytes(other.public_bytes(serialization.Encoding.PEM))
        cert, key = _server_cert(ca, ca_key)
        (work / "server.pem").write_bytes(cert)
        (work / "server-key.pem").write_bytes(key)
        self.se_port = free_port(OUTBOUND)
        self.tls_port = free_port(BACKEND)
        self.xds_port, self.status_port, self.admin_port = free_port(), free_port(), free_port()
        self.procs: list[subprocess.Popen[bytes]] = []
        self.client = httpx.Client(timeout=10.0)
        self.server: http.server.ThreadingHTTPServer | None = None
        self.sni: list[str | None] = []  # the server names TLS clients asked for

    def entry(self) -> str:
        return f"""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: secure, namespace: shop}}
spec:
  hosts: [{HOST}]
  location: MESH_EXTERNAL
  ports: [{{number: {self.se_port}, name: http, protocol: HTTP, targetPort: {self.tls_port}}}]
  resolution: STATIC
  endpoints: [{{address: {BACKEND}}}]
"""

    def rule(self, ca_file: Path) -> str:
        return f"""
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: secure, namespace: shop}}
spec:
  host: {HOST}
  trafficPolicy:
    tls: {{mode: SIMPLE, sni: {HOST}, caCertificates: {ca_file}, subjectAltNames: [{HOST}]}}
"""

    def start(self) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.work / "server.pem", self.work / "server-key.pem")
        ctx.sni_callback = lambda _sock, name, _ctx: self.sni.append(name)  # type: ignore[assignment,misc]
        self.server = http.server.ThreadingHTTPServer((BACKEND, self.tls_port), _Handler)
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        (self.config / "00-ns.yaml").write_text("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n")
        (self.config / "10-entry.yaml").write_text(self.entry())
        (self.config / "20-rule.yaml").write_text(self.rule(self.ca_file))
        start_client_sidecar(self.work, self.procs, node_id="tls-client", outbound=OUTBOUND, xds=self.xds_port,
                             status=self.status_port, admin=self.admin_port)
        wait_port(OUTBOUND, self.se_port)

    def close(self) -> None:
        self.client.close()
        for p in reversed(self.procs):
            stop(p)
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def get(self) -> httpx.Response:
        return self.client.get(f"http://{OUTBOUND}:{self.se_port}/", headers={"host": HOST})

    def write(self, name: str, text: str) -> None:
        write_config(self.config, name, text)


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    with tempfile.TemporaryDirectory(prefix="meshline-se-tls-") as d:
        yield from started(Env(Path(d)))


def test_the_sidecar_originates_tls_to_the_external_host(env: Env) -> None:
    r = eventually(lambda: (resp := env.get()).status_code == 200 and resp)
    assert r.json() == {"backend": "tls"}
    assert env.sni and env.sni[-1] == HOST


def test_a_wrong_ca_or_no_rule_fails(env: Env) -> None:
    env.write("20-rule.yaml", env.rule(env.other_ca_file))
    eventually(lambda: env.get().status_code == 503)  # the backend's certificate does not verify
    (env.config / "20-rule.yaml").unlink()
    eventually(lambda: env.get().status_code in (502, 503))  # plain HTTP to a TLS port
    env.write("20-rule.yaml", env.rule(env.ca_file))
    eventually(lambda: env.get().status_code == 200)
