"""DestinationRule `tls: {mode: MUTUAL, credentialName}` end to end (issue 16), with real
Envoy sidecars authenticated to `meshline serve --ca-dir` (one delta, one SotW) and a Python
HTTPS server that requires a client certificate of its CA (CERT_REQUIRED).

- The rule and its Secret arrive after the sidecars hold a plaintext cluster for the service:
  the changed cluster warms and is served at once (no initial-fetch timeout in Envoy), and the
  server sees the Secret's client certificate.
- The Secret replaced with a certificate of another CA: handshakes refused, 503, no Envoy restart;
  put back: 200 again.
- The Secret deleted: requests fail (503) and never reach the server, in TLS or in plaintext;
  Envoy no longer holds the deleted certificate; /v1/config/errors names the DestinationRule and
  `spec.trafficPolicy.tls.credentialName`.
- A sidecar in another namespace, to which the rule applies too, never gets the Secret: its
  Envoy holds only the fail-closed stand-ins, and a stream authenticated for that namespace that
  asks for the names explicitly gets the stand-ins, an unauthenticated one nothing.
Starts `meshline serve`, Envoys and a TLS server on loopback (I/O: processes, ports)."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

from controlplane.localrun import free_port, start_envoy, stop, wait_http
from controlplane.translate.plan import SECRET
from controlplane.translate.secrets import TRUSTS_NOTHING_CA
from tests.e2e.conftest import ROOT, eventually, started
from tests.e2e.test_locality_mutual_e2e import Pki, TlsServer
from tests.identityharness import auth, token_for
from tests.xdsharness import AdsClient

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]
NS, OTHER = "cred", "elsewhere"
PORT = 19621
TLS_IP = "127.0.0.181"
HOST = f"secure.{NS}.svc.cluster.local"
CLUSTER = f"outbound|{PORT}||{HOST}"
SIDECARS = {"cart-delta": (NS, "delta", "127.0.0.182"), "cart-sotw": (NS, "sotw", "127.0.0.183"),
            "stranger": (OTHER, "delta", "127.0.0.184")}
CRED, CACERT = "kubernetes://client-cred", "kubernetes://client-cred-cacert"


def mesh_yaml() -> str:
    docs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}},
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": OTHER}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "secure", "namespace": NS},
         "spec": {"ports": [{"name": "http", "port": PORT}]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "secure-1", "namespace": NS, "labels": {"kubernetes.io/service-name": "secure"}},
         "addressType": "IPv4", "ports": [{"name": "http", "port": PORT}], "endpoints": [{"addresses": [TLS_IP]}]},
    ]
    return yaml.safe_dump_all(docs, sort_keys=False)


DR = yaml.safe_dump({
    "apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": {"name": "secure", "namespace": NS},
    "spec": {"host": HOST, "trafficPolicy": {"tls": {"mode": "MUTUAL", "credentialName": "client-cred",
                                                     "sni": "secure.example"}}}})


def secret_yaml(cert: str, key: str, ca: str) -> str:
    data = {k: base64.b64encode(v.encode()).decode() for k, v in (("tls.crt", cert), ("tls.key", key), ("ca.crt", ca))}
    return yaml.safe_dump({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                           "metadata": {"name": "client-cred", "namespace": NS}, "data": data})


class Env:
    def __init__(self, work: Path, pki: Pki) -> None:
        self.work, self.pki = work, pki
        self.config = work / "config"
        self.config.mkdir()
        self.ca_dir = work / "ca"
        self.xds, self.status = free_port(), free_port()
        self.serve: subprocess.Popen[bytes] | None = None
        self.envoys: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
        self.http = httpx.Client(timeout=10)

    def write(self, name: str, text: str) -> None:
        tmp = self.config / f".{name}.tmp"
        tmp.write_text(text)
        tmp.rename(self.config / name)

    def start(self) -> None:
        self.write("mesh.yaml", mesh_yaml())
        self.serve = subprocess.Popen(
            [sys.executable, "-m", "controlplane.cli", "serve", "--config-dir", str(self.config),
             "--ca-dir", str(self.ca_dir), "--xds-address", f"127.0.0.1:{self.xds}",
             "--status-address", f"127.0.0.1:{self.status}"],
            stdout=open(self.work / "meshline.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
        wait_http(f"http://127.0.0.1:{self.status}/readyz", proc=self.serve, timeout=60)
        for name, (ns, protocol, outbound) in SIDECARS.items():
            admin = free_port()
            out = subprocess.run(
                [sys.executable, "-m", "controlplane.cli", "bootstrap", "--node-id", f"{name}.{ns}", "--namespace", ns,
                 "--workload", name, "--service-account", name.split("-")[0], "--capture", "bind",
                 "--xds-protocol", protocol, "--ca-dir", str(self.ca_dir), "--outbound-address", outbound,
                 "--xds-address", f"127.0.0.1:{self.xds}", "--admin-address", f"127.0.0.1:{admin}"],
                capture_output=True, text=True, cwd=ROOT, timeout=60)
            assert out.returncode == 0, out.stderr
            p = start_envoy(out.stdout, self.work, name, log_level="info")
            self.envoys[name] = (p, admin)
            wait_http(f"http://127.0.0.1:{admin}/ready", proc=p)
        # Every sidecar holds the service's cluster, plain, before the rule exists.
        for name in SIDECARS:
            eventually(lambda n=name: self.get(n).status_code == 503)  # the server refuses plaintext

    def get(self, sidecar: str) -> httpx.Response:
        outbound = SIDECARS[sidecar][2]
        return self.http.get(f"http://{outbound}:{PORT}/", headers={"host": HOST})

    def admin(self, sidecar: str, path: str, **params: str) -> Any:
        r = self.http.get(f"http://127.0.0.1:{self.envoys[sidecar][1]}{path}", params=params)
        r.raise_for_status()
        return r.json() if params.get("format") == "json" or path == "/config_dump" else r.text

    def stat(self, sidecar: str, name: str) -> int:
        text = self.admin(sidecar, "/stats", filter=f"^{re.escape(name)}$")
        values = [int(v) for k, v in (line.rsplit(":", 1) for line in text.splitlines()) if k.strip() == name]
        assert values, f"Envoy has no stat {name}"
        return sum(values)

    def secrets_held(self, sidecar: str) -> dict[str, secret_pb2.Secret]:
        """The active dynamic secrets of `sidecar`'s Envoy, by name (private keys come redacted)."""
        dump = self.admin(sidecar, "/config_dump", resource="dynamic_active_secrets")
        out: dict[str, secret_pb2.Secret] = {}
        for entry in dump.get("configs", []):
            s = secret_pb2.Secret()
            raw = dict(entry["secret"])
            raw.pop("@type", None)
            from google.protobuf import json_format

            json_format.ParseDict(raw, s, ignore_unknown_fields=True)
            out[entry["name"]] = s
        return out

    def errors(self) -> list[dict[str, Any]]:
        return list(self.http.get(f"http://127.0.0.1:{self.status}/v1/config/errors").json())

    def close(self) -> None:
        self.http.close()
        for p, _ in self.envoys.values():
            stop(p)
        stop(self.serve)


@pytest.fixture(scope="module")
def pki() -> Iterator[Pki]:
    with tempfile.TemporaryDirectory(prefix="meshline-credpki-") as d:
        yield Pki(Path(d))


@pytest.fixture(scope="module")
def server(pki: Pki) -> Iterator[TlsServer]:
    s = TlsServer(pki, TLS_IP, PORT, one_request_per_connection=True)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(scope="module")
def env(pki: Pki, server: TlsServer) -> Iterator[Env]:
    with tempfile.TemporaryDirectory(prefix="meshline-cred-") as d:
        yield from started(Env(Path(d), pki))


MINE = ("cart-delta", "cart-sotw")


def _ok(env: Env, sidecar: str) -> bool:
    r = env.get(sidecar)
    return r.status_code == 200 and r.text == "secure-ok client=client\n"


def _cert_pem(s: secret_pb2.Secret) -> bytes:
    return bytes(s.tls_certificate.certificate_chain.inline_bytes)


def test_the_secrets_client_certificate_is_presented(env: Env, server: TlsServer) -> None:
    env.write("secret.yaml", secret_yaml(env.pki.client_pem, env.pki.client_key, env.pki.ca_pem))
    env.write("dr.yaml", DR)
    for sidecar in MINE:
        eventually(lambda s=sidecar: _ok(env, s))
        held = env.secrets_held(sidecar)
        assert _cert_pem(held[CRED]) == env.pki.client_pem.encode()
        assert bytes(held[CACERT].validation_context.trusted_ca.inline_bytes) == env.pki.ca_pem.encode()
        # The changed cluster got its endpoints at once: Envoy never waited out an initial fetch
        # (what used to hold the credential's SDS request back for 15 s).
        assert env.stat(sidecar, f"cluster.{CLUSTER}.init_fetch_timeout") == 0
    assert server.served >= 2
    assert not [e for e in env.errors() if e["kind"] == "DestinationRule"]


def test_a_certificate_of_another_ca_is_refused_without_restarting_envoy(env: Env, server: TlsServer) -> None:
    pids = {n: p.pid for n, (p, _) in env.envoys.items()}
    env.write("secret.yaml", secret_yaml(env.pki.wrong_pem, env.pki.wrong_key, env.pki.ca_pem))
    stat = f"cluster.{CLUSTER}.ssl.connection_error"
    for sidecar in MINE:
        eventually(lambda s=sidecar: env.get(s).status_code == 503)
        served, refused, errors = server.served, len(server.refusals), env.stat(sidecar, stat)
        assert [env.get(sidecar).status_code for _ in range(5)] == [503] * 5
        assert len(server.refusals) > refused and server.served == served
        assert env.stat(sidecar, stat) > errors
        assert _cert_pem(env.secrets_held(sidecar)[CRED]) == env.pki.wrong_pem.encode()
    # The same Envoy processes all along, and the right certificate works again.
    assert all(p.poll() is None and p.pid == pids[n] for n, (p, _) in env.envoys.items())
    env.write("secret.yaml", secret_yaml(env.pki.client_pem, env.pki.client_key, env.pki.ca_pem))
    for sidecar in MINE:
        eventually(lambda s=sidecar: _ok(env, s))


def test_a_deleted_secret_fails_closed_and_is_reported(env: Env, server: TlsServer) -> None:
    for sidecar in MINE:
        eventually(lambda s=sidecar: _ok(env, s))
    (env.config / "secret.yaml").unlink()

    def reported() -> bool:
        return any(e["object"] == f"DestinationRule/{NS}/secure" and e["field"] == "spec.trafficPolicy.tls.credentialName"
                   and e["severity"] == "error" and "client-cred" in e["message"] for e in env.errors())

    eventually(reported)
    for sidecar in MINE:
        eventually(lambda s=sidecar: env.get(s).status_code == 503)
    served, refused = server.served, len(server.refusals)
    for sidecar in MINE:
        assert [env.get(sidecar).status_code for _ in range(5)] == [503] * 5
        # Envoy no longer holds the deleted certificate, and trusts no server for the rule.
        held = env.secrets_held(sidecar)
        assert env.pki.client_pem.encode() not in _cert_pem(held[CRED])
        assert bytes(held[CACERT].validation_context.trusted_ca.inline_bytes) == TRUSTS_NOTHING_CA.encode()
        # Still TLS: the cluster's transport socket did not fall back to plaintext.
        clusters = env.admin(sidecar, "/config_dump", resource="dynamic_active_clusters")
        (c,) = [x["cluster"] for x in clusters["configs"] if x["cluster"]["name"] == CLUSTER]
        assert c["transport_socket"]["name"] == "envoy.transport_sockets.tls"
    # Nothing reached the server: no request served, no plaintext (SSL's HTTP_REQUEST) and no
    # client certificate offered (Envoy refuses the server's certificate first).
    assert server.served == served
    assert "HTTP_REQUEST" not in server.refusals[refused:]
    # The Secret comes back: so does the traffic.
    env.write("secret.yaml", secret_yaml(env.pki.client_pem, env.pki.client_key, env.pki.ca_pem))
    for sidecar in MINE:
        eventually(lambda s=sidecar: _ok(env, s))
    eventually(lambda: not reported())


def test_a_sidecar_in_another_namespace_never_gets_the_secret(env: Env) -> None:
    for sidecar in MINE:
        eventually(lambda s=sidecar: _ok(env, s))
    # The rule applies to the stranger's client too (exported to every namespace), but the
    # credential is looked up in its own namespace, which has none: it fails closed.
    assert [env.get("stranger").status_code for _ in range(3)] == [503] * 3
    held = env.secrets_held("stranger")
    assert set(held) >= {CRED, CACERT}
    assert env.pki.client_pem.encode() not in _cert_pem(held[CRED])
    assert bytes(held[CACERT].validation_context.trusted_ca.inline_bytes) == TRUSTS_NOTHING_CA.encode()

    async def ask(token: str | None) -> dict[str, secret_pb2.Secret]:
        c = AdsClient(f"127.0.0.1:{env.xds}", "delta", "prober", {"namespace": OTHER, "service_account": "prober"},
                      metadata=auth(token) if token else ())
        try:
            c.send_delta(SECRET, subscribe=[CRED, CACERT])
            got: dict[str, secret_pb2.Secret] = {}
            try:
                while True:
                    resp = await c.recv(timeout=3.0)
                    for r in resp.resources:
                        s = secret_pb2.Secret()
                        r.resource.Unpack(s)
                        got[s.name] = s
                    c.send_delta(SECRET, nonce=resp.nonce)
            except TimeoutError:
                return got
        finally:
            await c.close()

    authenticated = asyncio.run(ask(token_for(env.ca_dir, OTHER, "prober")))
    assert set(authenticated) == {CRED, CACERT}
    assert env.pki.client_pem.encode() not in _cert_pem(authenticated[CRED])
    assert env.pki.client_key.encode() not in bytes(authenticated[CRED].tls_certificate.private_key.inline_bytes)
    assert authenticated[CACERT].validation_context.trusted_ca.inline_bytes == TRUSTS_NOTHING_CA.encode()
    assert asyncio.run(ask(None)) == {}
    log = (env.work / "meshline.log").read_text()
    assert env.pki.client_key.split("\n")[1] not in log  # no key material in the control plane's log
    assert json.dumps(env.errors()).count("client-cred") == 0
