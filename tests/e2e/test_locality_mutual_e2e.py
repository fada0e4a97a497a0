"""Locality failover and MUTUAL TLS origination through real Envoy sidecars (issue 16).

- Locality failover (Istio's "Locality failover" task): a client sidecar in region1/zone-a
  calls a service with one backend in zone-a and one in zone-b of the same region; the
  DestinationRule has outlierDetection, so all traffic stays in zone-a. When zone-a's backend
  dies, outlier detection ejects it and traffic moves to zone-b; a client in zone-b is served
  by zone-b from the start.
- MUTUAL: an upstream TLS server (Python `ssl`, CERT_REQUIRED) accepts only client
  certificates of its CA. A DestinationRule `tls: {mode: MUTUAL, clientCertificate,
  privateKey, caCertificates}` (files Envoy reads) gets requests through; pointing it at a
  certificate of another CA makes them fail (503), the server sees the rejected handshakes
  and Envoy counts the TLS failures. (`credentialName` over SDS: test_credential_name_e2e.py.)
Starts `meshline serve` on a directory, Python backends and Envoys (I/O: processes, ports)."""

from __future__ import annotations

import base64
import datetime as dt
import re
import ssl
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from controlplane.localrun import free_port, start_envoy, stop, wait_http
from tests.e2e.conftest import ROOT, eventually

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]
NS = "loc"
PORT = 19610
TLS_PORT = 19611
A_IP, B_IP, TLS_IP = "127.0.0.161", "127.0.0.162", "127.0.0.171"
ZONE_A = {"topology.kubernetes.io/region": "region1", "topology.kubernetes.io/zone": "zone-a"}
ZONE_B = {"topology.kubernetes.io/region": "region1", "topology.kubernetes.io/zone": "zone-b"}


# --------------------------------------------------------------------------- certificates


def _cert(name: str, issuer: tuple[Any, Any] | None, *, ca: bool = False, dns: str | None = None,
          client: bool = False) -> tuple[Any, Any, str, str]:
    """(cert, key, cert PEM, key PEM), self-signed when `issuer` is None."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_cert, issuer_key = issuer if issuer else (None, key)
    now = dt.datetime.now(dt.UTC)
    b = (x509.CertificateBuilder().subject_name(subject)
         .issuer_name(issuer_cert.subject if issuer_cert is not None else subject)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if dns:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(dns)]), critical=False)
    if not ca:
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    cert = b.sign(issuer_key, hashes.SHA256())
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    return cert, key, cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem


class Pki:
    """A CA with a server certificate (DNS secure.example) and a client certificate, and a
    client certificate of another CA (the wrong credential)."""

    def __init__(self, d: Path) -> None:
        ca_c, ca_k, self.ca_pem, _ = _cert("mesh-test-ca", None, ca=True)
        _, _, self.server_pem, self.server_key = _cert("secure", (ca_c, ca_k), dns="secure.example")
        _, _, self.client_pem, self.client_key = _cert("client", (ca_c, ca_k), client=True)
        rogue_c, rogue_k, _, _ = _cert("rogue-ca", None, ca=True)
        _, _, self.wrong_pem, self.wrong_key = _cert("client", (rogue_c, rogue_k), client=True)
        self.files: dict[str, Path] = {}
        for name, text in [("ca.pem", self.ca_pem), ("server.pem", self.server_pem),
                           ("server-key.pem", self.server_key), ("client.pem", self.client_pem),
                           ("client-key.pem", self.client_key), ("wrong.pem", self.wrong_pem),
                           ("wrong-key.pem", self.wrong_key)]:
            (d / name).write_text(text)
            self.files[name] = d / name


class TlsServer:
    """HTTPS on ip:port (default TLS_IP:TLS_PORT) that requires a client certificate of the
    test CA; counts the requests served and keeps the reason of each handshake it refused
    (plaintext HTTP shows as SSL's HTTP_REQUEST). With `one_request_per_connection` every
    request takes a new handshake (so each shows the certificate the client holds now).
    Also used by tests/e2e/test_credential_name_e2e.py."""

    def __init__(self, pki: Pki, ip: str = TLS_IP, port: int = TLS_PORT,
                 one_request_per_connection: bool = False) -> None:
        self.served = 0
        self.refusals: list[str] = []
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(str(pki.files["ca.pem"]))
        ctx.load_cert_chain(str(pki.files["server.pem"]), str(pki.files["server-key.pem"]))
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                return

            def do_GET(self) -> None:
                peer = self.connection.getpeercert()  # type: ignore[attr-defined]
                cn = dict(x[0] for x in peer["subject"])["commonName"] if peer else ""
                outer.served += 1
                body = f"secure-ok client={cn}\n".encode()
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                if one_request_per_connection:
                    self.send_header("connection", "close")
                self.end_headers()
                self.wfile.write(body)
                if one_request_per_connection:
                    self.close_connection = True

        class Server(ThreadingHTTPServer):
            def get_request(self) -> tuple[Any, Any]:
                sock, addr = self.socket.accept()
                try:
                    return ctx.wrap_socket(sock, server_side=True), addr
                except (ssl.SSLError, OSError) as exc:
                    outer.refusals.append(getattr(exc, "reason", None) or type(exc).__name__)
                    sock.close()
                    raise

        self.httpd = Server((ip, port), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def refused(self) -> int:
        return len(self.refusals)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# --------------------------------------------------------------------------- the mesh


def _pod(name: str, ip: str, labels: dict[str, str], injected: bool = False) -> dict[str, Any]:
    ann = {"meshline.io/status": "injected"} if injected else {}
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NS, "labels": labels, "annotations": ann},
            "spec": {"serviceAccountName": name.split("-")[0], "containers": [{"name": "app", "image": "x"}]},
            "status": {"podIP": ip}}


def mesh_yaml() -> str:
    docs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "hello", "namespace": NS},
         "spec": {"selector": {"app": "hello"}, "ports": [{"name": "http", "port": PORT}]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "hello-1", "namespace": NS, "labels": {"kubernetes.io/service-name": "hello"}},
         "addressType": "IPv4", "ports": [{"name": "http", "port": PORT}],
         "endpoints": [{"addresses": [A_IP], "targetRef": {"kind": "Pod", "name": "hello-a"}},
                       {"addresses": [B_IP], "targetRef": {"kind": "Pod", "name": "hello-b"}}]},
        _pod("hello-a", A_IP, {"app": "hello", **ZONE_A}),
        _pod("hello-b", B_IP, {"app": "hello", **ZONE_B}),
        _pod("client-a", "127.0.0.163", {"app": "client", **ZONE_A}),
        _pod("client-b", "127.0.0.164", {"app": "client", **ZONE_B}),
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "secure", "namespace": NS},
         "spec": {"ports": [{"name": "http", "port": TLS_PORT}]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "secure-1", "namespace": NS, "labels": {"kubernetes.io/service-name": "secure"}},
         "addressType": "IPv4", "ports": [{"name": "http", "port": TLS_PORT}],
         "endpoints": [{"addresses": [TLS_IP]}]},
    ]
    return yaml.safe_dump_all(docs, sort_keys=False)


# Istio's locality failover task: outlier detection is what makes Envoy leave the local zone.
# (maxEjectionPercent 100: Envoy's default, 10%, ejects no host of a two-host cluster.)
FAILOVER_DR = f"""apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: hello, namespace: {NS}}}
spec:
  host: hello.{NS}.svc.cluster.local
  trafficPolicy:
    connectionPool: {{http: {{maxRequestsPerConnection: 1}}}}
    loadBalancer:
      simple: ROUND_ROBIN
      localityLbSetting: {{enabled: true, failover: [{{from: region1, to: region2}}]}}
    outlierDetection: {{consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 1m, maxEjectionPercent: 100}}
"""


def mutual_dr(cert: Path | None = None, key: Path | None = None, ca: Path | None = None,
              credential: str | None = None) -> str:
    tls: dict[str, Any] = {"mode": "MUTUAL", "sni": "secure.example"}
    if credential:
        tls["credentialName"] = credential
    else:
        tls.update(clientCertificate=str(cert), privateKey=str(key), caCertificates=str(ca))
    return yaml.safe_dump({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
                           "metadata": {"name": "secure", "namespace": NS},
                           "spec": {"host": f"secure.{NS}.svc.cluster.local", "trafficPolicy": {"tls": tls}}})


def secret_yaml(name: str, cert: str, key: str, ca: str) -> str:
    data = {k: base64.b64encode(v.encode()).decode() for k, v in (("tls.crt", cert), ("tls.key", key),
                                                                  ("ca.crt", ca))}
    return yaml.safe_dump({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                           "metadata": {"name": name, "namespace": NS}, "data": data})


class Env:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.config = work / "config"
        self.config.mkdir()
        self.ca_dir = work / "ca"
        self.xds, self.status = free_port(), free_port()
        self.procs: list[subprocess.Popen[bytes]] = []
        self.backends: dict[str, subprocess.Popen[bytes]] = {}
        self.envoys: dict[str, tuple[subprocess.Popen[bytes], int, str]] = {}
        self.http = httpx.Client(timeout=10)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "controlplane.cli", *args], capture_output=True, text=True,
                              cwd=ROOT, timeout=60)

    def write(self, name: str, text: str) -> None:
        tmp = self.config / f".{name}.tmp"
        tmp.write_text(text)
        tmp.rename(self.config / name)

    def start(self) -> None:
        self.write("mesh.yaml", mesh_yaml())
        self.write("dr-hello.yaml", FAILOVER_DR)
        for name, ip in (("hello-a", A_IP), ("hello-b", B_IP)):
            p = subprocess.Popen([sys.executable, str(ROOT / "samples" / "backend.py"), f"{name}={ip}:{PORT}"],
                                 stdout=subprocess.PIPE, start_new_session=True)
            assert p.stdout is not None and p.stdout.readline().strip() == b"ready"
            self.backends[name] = p
        log = open(self.work / "meshline.log", "wb")
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "controlplane.cli", "serve", "--config-dir", str(self.config),
             "--ca-dir", str(self.ca_dir),
             "--xds-address", f"127.0.0.1:{self.xds}", "--status-address", f"127.0.0.1:{self.status}"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT))
        wait_http(f"http://127.0.0.1:{self.status}/readyz", proc=self.procs[-1], timeout=60)

    def start_envoy(self, workload: str, outbound: str) -> None:
        admin = free_port()
        out = self.cli("bootstrap", "--node-id", f"{workload}.{NS}", "--namespace", NS, "--workload", workload,
                       "--service-account", workload.split("-")[0], "--capture", "bind",
                       "--ca-dir", str(self.ca_dir), "--outbound-address", outbound,
                       "--xds-address", f"127.0.0.1:{self.xds}", "--admin-address", f"127.0.0.1:{admin}")
        assert out.returncode == 0, out.stderr
        p = start_envoy(out.stdout, self.work, workload, log_level="info")
        self.envoys[workload] = (p, admin, outbound)
        wait_http(f"http://127.0.0.1:{admin}/ready", proc=p)

    def get(self, workload: str, host: str, port: int) -> httpx.Response:
        outbound = self.envoys[workload][2]
        return self.http.get(f"http://{outbound}:{port}/", headers={"host": host})

    def backend_of(self, workload: str) -> str:
        r = self.get(workload, f"hello.{NS}.svc.cluster.local", PORT)
        return str(r.json()["backend"]) if r.status_code == 200 else f"status {r.status_code}"

    def stat(self, workload: str, name: str) -> int:
        admin = self.envoys[workload][1]
        text = self.http.get(f"http://127.0.0.1:{admin}/stats", params={"filter": re.escape(name)}).text
        values = [line.rsplit(":", 1) for line in text.splitlines()]
        return sum(int(v) for k, v in values if k.strip() == name)

    def close(self) -> None:
        self.http.close()
        for p, _, _ in self.envoys.values():
            stop(p)
        for p in [*self.backends.values(), *reversed(self.procs)]:
            stop(p)


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    with tempfile.TemporaryDirectory(prefix="meshline-locality-") as d:
        e = Env(Path(d))
        try:
            e.start()
            e.start_envoy("client-a", "127.0.0.1")
            e.start_envoy("client-b", "127.0.0.165")
            yield e
        finally:
            e.close()


def test_traffic_stays_in_the_clients_zone_and_fails_over_when_it_is_ejected(env: Env) -> None:
    # Both backends are healthy: each client is served only by its own zone.
    eventually(lambda: env.backend_of("client-a") == "hello-a")
    eventually(lambda: env.backend_of("client-b") == "hello-b")
    assert [env.backend_of("client-a") for _ in range(20)] == ["hello-a"] * 20
    assert [env.backend_of("client-b") for _ in range(20)] == ["hello-b"] * 20
    # The proxies hold different load assignments: zone-b is priority 1 for client-a.
    admin = env.envoys["client-a"][1]
    clusters = env.http.get(f"http://127.0.0.1:{admin}/clusters", params={"format": "json"}).json()
    hosts = {h["address"]["socket_address"]["address"]: h.get("priority", 0)
             for c in clusters["cluster_statuses"] if c["name"] == f"outbound|{PORT}||hello.{NS}.svc.cluster.local"
             for h in c["host_statuses"]}
    assert hosts == {A_IP: 0, B_IP: 1}
    # zone-a's backend dies: outlier detection ejects it and client-a fails over to zone-b.
    stop(env.backends["hello-a"])

    def served_by_b() -> bool:
        return [env.backend_of("client-a") for _ in range(10)] == ["hello-b"] * 10

    eventually(served_by_b)
    assert env.stat("client-a", f"cluster.outbound|{PORT}||hello.{NS}.svc.cluster.local.outlier_detection.ejections_"
                                "enforced_total") >= 1
    assert [env.backend_of("client-b") for _ in range(10)] == ["hello-b"] * 10


@pytest.fixture(scope="module")
def pki() -> Iterator[Pki]:
    with tempfile.TemporaryDirectory(prefix="meshline-pki-") as d:
        yield Pki(Path(d))


@pytest.fixture(scope="module")
def tls_server(pki: Pki) -> Iterator[TlsServer]:
    s = TlsServer(pki)
    try:
        yield s
    finally:
        s.close()


def _secure(env: Env) -> httpx.Response:
    return env.get("client-a", f"secure.{NS}.svc.cluster.local", TLS_PORT)


def test_mutual_with_certificate_files(env: Env, pki: Pki, tls_server: TlsServer) -> None:
    f = pki.files
    env.write("dr-secure.yaml", mutual_dr(f["client.pem"], f["client-key.pem"], f["ca.pem"]))
    r = eventually(lambda: (resp := _secure(env)).status_code == 200 and resp)
    assert r.text == "secure-ok client=client\n"
    # The wrong client certificate: the server refuses the handshakes, nothing is served, and
    # Envoy counts the TLS failures.
    stat = f"cluster.outbound|{TLS_PORT}||secure.{NS}.svc.cluster.local.ssl.connection_error"
    env.write("dr-secure.yaml", mutual_dr(f["wrong.pem"], f["wrong-key.pem"], f["ca.pem"]))
    eventually(lambda: _secure(env).status_code == 503)
    served, refused, errors = tls_server.served, tls_server.refused, env.stat("client-a", stat)
    assert [_secure(env).status_code for _ in range(5)] == [503] * 5
    assert tls_server.refused > refused
    assert tls_server.served == served
    assert env.stat("client-a", stat) > errors
    # Back to the right one.
    env.write("dr-secure.yaml", mutual_dr(f["client.pem"], f["client-key.pem"], f["ca.pem"]))
    eventually(lambda: _secure(env).status_code == 200)
