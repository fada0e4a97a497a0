"""Identity and mTLS with real Envoys on loopback: a client sidecar and a server sidecar
(bind capture) get SPIFFE certificates over SDS from Meshline's CA; traffic between them is
mutual TLS; PeerAuthentication and AuthorizationPolicy are enforced; certificates and
roots rotate without failed requests; no private key leaks."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from controlplane.localrun import free_port, start_envoy, stop, wait_http
from tests.e2e.conftest import ROOT, eventually

pytestmark = pytest.mark.e2e
NS = "sec"
PORT = 19580
SERVER_IP, SERVER_APP = "127.0.0.141", "127.0.1.141"
CLIENT_IP, OTHER_IP = "127.0.0.142", "127.0.0.143"
CERT_TTL = 6  # seconds: several rotations within a test


def mesh_yaml() -> str:
    docs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace",
         "metadata": {"name": NS, "labels": {"meshline.io/dataplane-mode": "sidecar"}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "server", "namespace": NS},
         "spec": {"selector": {"app": "server"}, "ports": [{"name": "http", "port": PORT, "targetPort": PORT}]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "server-1", "namespace": NS, "labels": {"kubernetes.io/service-name": "server"}},
         "addressType": "IPv4", "ports": [{"name": "http", "port": PORT}],
         "endpoints": [{"addresses": [SERVER_IP], "conditions": {"ready": True},
                        "targetRef": {"kind": "Pod", "name": "server-0", "namespace": NS}}]},
    ]
    for name, ip, sa, extra in [("server-0", SERVER_IP, "server", {"meshline.io/app-address": SERVER_APP}),
                                ("client-0", CLIENT_IP, "client", {}), ("other-0", OTHER_IP, "other", {})]:
        docs.append({"apiVersion": "v1", "kind": "Pod",
                     "metadata": {"name": name, "namespace": NS, "labels": {"app": name.split("-")[0]},
                                  "annotations": {"meshline.io/status": "injected", **extra}},
                     "spec": {"serviceAccountName": sa,
                              "containers": [{"name": "app", "image": "x", "ports": [{"containerPort": PORT}]}]},
                     "status": {"podIP": ip}})
    return yaml.safe_dump_all(docs, sort_keys=False)


STRICT = f"""apiVersion: security.meshline.io/v1
kind: PeerAuthentication
metadata: {{name: default, namespace: {NS}}}
spec:
  mtls: {{mode: STRICT}}
"""

AUTHZ = f"""apiVersion: security.meshline.io/v1
kind: AuthorizationPolicy
metadata: {{name: server-allow, namespace: {NS}}}
spec:
  selector: {{matchLabels: {{app: server}}}}
  action: ALLOW
  rules:
  - from:
    - source: {{principals: ["cluster.local/ns/{NS}/sa/client"]}}
    to:
    - operation: {{methods: ["GET"], paths: ["/allowed*"]}}
---
apiVersion: security.meshline.io/v1
kind: AuthorizationPolicy
metadata: {{name: server-deny, namespace: {NS}}}
spec:
  selector: {{matchLabels: {{app: server}}}}
  action: DENY
  rules:
  - to:
    - operation: {{paths: ["/allowed/secret"]}}
"""


class Env:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.config = work / "config"
        self.config.mkdir()
        self.ca_dir = work / "ca"
        self.xds, self.status = free_port(), free_port()
        self.procs: list[subprocess.Popen[bytes]] = []
        self.envoys: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
        self.http = httpx.Client(timeout=5)
        self.serve_args: list[str] = []  # extra `meshline serve` flags
        self.mesh_yaml = mesh_yaml()

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "controlplane.cli", *args], capture_output=True, text=True,
                              cwd=ROOT, timeout=60)

    def start(self) -> None:
        (self.config / "mesh.yaml").write_text(self.mesh_yaml)
        self.procs.append(subprocess.Popen(
            [sys.executable, str(ROOT / "samples" / "backend.py"), f"server-app={SERVER_APP}:{PORT}"],
            stdout=subprocess.PIPE, start_new_session=True))
        assert self.procs[-1].stdout is not None and self.procs[-1].stdout.readline().strip() == b"ready"
        log = open(self.work / "meshline.log", "wb")
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "controlplane.cli", "serve", "--config-dir", str(self.config),
             "--ca-dir", str(self.ca_dir), "--workload-cert-ttl", str(CERT_TTL),
             "--xds-address", f"127.0.0.1:{self.xds}", "--status-address", f"127.0.0.1:{self.status}",
             "--ca-address", f"127.0.0.1:{free_port()}", *self.serve_args],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT))
        wait_http(f"http://127.0.0.1:{self.status}/readyz", proc=self.procs[-1], timeout=30)
        for name, sa in [("server-0", "server"), ("client-0", "client")]:
            self.start_envoy(name, sa)

    def start_envoy(self, workload: str, sa: str, outbound: str | None = None) -> None:
        admin = free_port()
        # Two sidecars on one host: each binds its outbound listeners on its own loopback address.
        outbound = outbound or ("127.0.0.1" if workload == "client-0" else "127.0.0.151")
        out = self.cli("bootstrap", "--node-id", f"{workload}.{NS}", "--namespace", NS, "--workload", workload,
                       "--service-account", sa, "--capture", "bind", "--ca-dir", str(self.ca_dir),
                       "--outbound-address", outbound,
                       "--xds-address", f"127.0.0.1:{self.xds}", "--admin-address", f"127.0.0.1:{admin}")
        assert out.returncode == 0, out.stderr
        p = start_envoy(out.stdout, self.work, workload, log_level="info")
        self.envoys[workload] = (p, admin)
        wait_http(f"http://127.0.0.1:{admin}/ready", proc=p)

    def close(self) -> None:
        self.http.close()
        for p, _ in self.envoys.values():
            stop(p)
        for p in reversed(self.procs):
            stop(p)

    def call(self, path: str = "/allowed", method: str = "GET") -> httpx.Response:
        """From the client app through the client sidecar (outbound 127.0.0.1:PORT) to the server."""
        return self.http.request(method, f"http://127.0.0.1:{PORT}{path}", headers={"host": f"server.{NS}"})

    def admin_json(self, workload: str, path: str) -> Any:
        return self.http.get(f"http://127.0.0.1:{self.envoys[workload][1]}{path}").json()

    def serial(self, workload: str) -> str:
        """Serial of the SPIFFE certificate Envoy currently serves (admin /certs)."""
        for c in self.admin_json(workload, "/certs")["certificates"]:
            for chain in c.get("cert_chain", []):
                if any("spiffe://" in (s.get("uri") or "") for s in chain.get("subject_alt_names", [])):
                    return str(chain["serial_number"])
        return ""

    def mint(self, sa: str, ca_dir: Path | None = None) -> tuple[Path, Path]:
        """A workload certificate for `sa` from the CA files (what a proxy of that identity holds)."""
        # A copy of the CA files: loading the live directory would look like a CA change to the server.
        import shutil

        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        from controlplane.ca import CertificateAuthority

        copy = Path(tempfile.mkdtemp(dir=self.work)) / "ca"
        shutil.copytree(ca_dir or self.ca_dir, copy, ignore=shutil.ignore_patterns("*.lock", ".*"))
        ca = CertificateAuthority.load_or_create(copy)
        key = ec.generate_private_key(ec.SECP256R1())
        chain = ca.issue_workload((NS, sa), key.public_key(), dt.timedelta(hours=1))
        d = Path(tempfile.mkdtemp(dir=self.work))
        (d / "cert.pem").write_text(chain)
        (d / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                      serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
        return d / "cert.pem", d / "key.pem"

    def direct(self, cert: tuple[Path, Path] | None, path: str = "/allowed", method: str = "GET",
               tls: bool = True) -> int:
        """Straight to the server sidecar's inbound listener, as a peer with `cert`."""
        with socket.create_connection((SERVER_IP, PORT), timeout=5) as raw:
            sock: socket.socket = raw
            if tls:
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                ctx.check_hostname = False
                ctx.load_verify_locations(cadata=(self.ca_dir / "root-cert.pem").read_text())
                if cert is not None:
                    ctx.load_cert_chain(str(cert[0]), str(cert[1]))
                sock = ctx.wrap_socket(raw)
            sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: server.{NS}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        if not data:
            raise ConnectionError("closed without a response")
        return int(data.split(b" ", 2)[1])


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    with tempfile.TemporaryDirectory(prefix="meshline-mtls-") as d:
        e = Env(Path(d))
        try:
            e.start()
            yield e
        finally:
            e.close()


def write(env: Env, name: str, text: str) -> None:
    tmp = env.config / f".{name}.tmp"
    tmp.write_text(text)
    tmp.rename(env.config / name)


def test_sidecar_to_sidecar_mtls_carries_the_client_identity(env: Env) -> None:
    r = eventually(lambda: env.call("/allowed/x") if env.call("/allowed/x").status_code == 200 else None,
                   timeout=20)
    xfcc = r.json()["headers"].get("x-forwarded-client-cert", "")
    assert f"URI=spiffe://cluster.local/ns/{NS}/sa/client" in xfcc
    # The server sidecar presents its own SPIFFE identity, issued by Meshline's CA.
    chain = ssl.get_server_certificate((SERVER_IP, PORT))
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(chain.encode())
    uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier)
    assert uris == [f"spiffe://cluster.local/ns/{NS}/sa/server"]


def test_foreign_ca_is_rejected(env: Env, tmp_path: Path) -> None:
    from controlplane.ca import CertificateAuthority

    rogue_dir = tmp_path / "rogue"
    CertificateAuthority.load_or_create(rogue_dir)
    rogue = env.mint("client", rogue_dir)
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        env.direct(rogue)
    assert env.direct(env.mint("client")) == 200


def test_strict_rejects_plaintext_permissive_accepts_both(env: Env) -> None:
    # PERMISSIVE is the default: plaintext reaches the app too.
    assert env.direct(None, tls=False) == 200
    write(env, "pa.yaml", STRICT)
    eventually(lambda: _plaintext_refused(env))
    assert env.call("/allowed").status_code == 200  # mesh traffic keeps flowing
    # Port-level override back to PERMISSIVE for this workload's port.
    write(env, "pa.yaml", STRICT + f"""---
apiVersion: security.meshline.io/v1
kind: PeerAuthentication
metadata: {{name: server-port, namespace: {NS}}}
spec:
  selector: {{matchLabels: {{app: server}}}}
  mtls: {{mode: STRICT}}
  portLevelMtls:
    {PORT}: {{mode: PERMISSIVE}}
""")
    eventually(lambda: _plaintext_ok(env))
    write(env, "pa.yaml", STRICT)
    eventually(lambda: _plaintext_refused(env))
    (env.config / "pa.yaml").unlink()
    eventually(lambda: _plaintext_ok(env))


def _plaintext_ok(env: Env) -> bool:
    try:
        return env.direct(None, tls=False) == 200
    except OSError:
        return False


def _plaintext_refused(env: Env) -> bool:
    try:
        env.direct(None, tls=False)
    except (ConnectionError, OSError):
        return True
    return False


def _status(env: Env, cert: tuple[Path, Path]) -> int:
    try:
        return env.direct(cert)
    except OSError:
        return 0


def test_authorization_policy(env: Env) -> None:
    write(env, "authz.yaml", AUTHZ)
    client = env.mint("client")
    other = env.mint("other")
    eventually(lambda: _status(env, other) == 403)  # default-deny once an ALLOW exists
    assert env.direct(client, "/allowed/ok") == 200
    assert env.direct(client, "/elsewhere") == 403  # path not allowed
    assert env.direct(client, "/allowed/ok", method="POST") == 403  # method not allowed
    assert env.direct(client, "/allowed/secret") == 403  # DENY wins over ALLOW
    assert env.call("/allowed/ok").status_code == 200  # through the client sidecar: principal client
    (env.config / "authz.yaml").unlink()
    eventually(lambda: _status(env, other) == 200)


def test_certificates_rotate_without_failed_requests(env: Env) -> None:
    failures: list[str] = []
    done = threading.Event()

    def hammer() -> None:
        with httpx.Client(timeout=5) as c:
            while not done.is_set():
                try:
                    r = c.get(f"http://127.0.0.1:{PORT}/allowed", headers={"host": f"server.{NS}"})
                    if r.status_code != 200:
                        failures.append(str(r.status_code))
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                time.sleep(0.01)

    first = eventually(lambda: env.serial("server-0"))
    t = threading.Thread(target=hammer)
    t.start()
    try:
        seen = {first}
        deadline = time.monotonic() + CERT_TTL * 3
        while len(seen) < 3 and time.monotonic() < deadline:
            s = env.serial("server-0")
            if s:
                seen.add(s)
            time.sleep(0.2)
    finally:
        done.set()
        t.join()
    assert len(seen) >= 3, seen  # at least two rotations observed in Envoy's admin /certs
    assert failures == []


def test_root_rotation_keeps_traffic_flowing(env: Env) -> None:
    before = (env.ca_dir / "root-cert.pem").read_text()
    out = env.cli("ca", "rotate-root", "--ca-dir", str(env.ca_dir))
    assert out.returncode == 0, out.stderr
    assert (env.ca_dir / "root-cert.pem").read_text() != before
    for _ in range(CERT_TTL * 5):  # across the overlap and re-issuance
        assert env.call("/allowed").status_code == 200
        time.sleep(0.2)
    out = env.cli("ca", "finish-rotation", "--ca-dir", str(env.ca_dir))
    assert out.returncode == 0, out.stderr
    eventually(lambda: env.call("/allowed").status_code == 200)
    for _ in range(10):
        assert env.call("/allowed").status_code == 200
        time.sleep(0.1)


def test_no_private_key_in_api_dumps_or_logs(env: Env) -> None:
    base = f"http://127.0.0.1:{env.status}"
    texts = [env.http.get(f"{base}/v1/proxies").text, env.http.get(f"{base}/v1/mesh").text]
    for wl in env.envoys:
        node = f"{wl}.{NS}"
        for t in ("secrets", "clusters", "listeners"):
            texts.append(env.http.get(f"{base}/v1/proxies/{node}/config", params={"type": t}).text)
    secrets = env.http.get(f"{base}/v1/proxies/server-0.{NS}/config", params={"type": "secrets"}).json()
    assert any(r["name"] == "default" for r in secrets["resources"])
    texts.append((env.work / "meshline.log").read_text(errors="replace"))
    key_pem = (env.ca_dir / "ca-key.pem").read_text()
    key_body = "".join(key_pem.splitlines()[1:-1])[:40]
    for text in texts:
        assert "PRIVATE KEY" not in text
        assert key_body not in text.replace("\n", "").replace("\\n", "")
